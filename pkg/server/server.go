// Package server is boxlite serve's REST API v1 (docs/api.yaml) over an
// api.Boxes, in practice the daemon's manager.Service: every handler decodes
// a request, calls the one implementation of the operation, and encodes its
// answer or its error as {code, message}.
package server

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/api"
)

// Bounds of the server.
const (
	// maxBody bounds a request body.
	maxBody = 1 << 20
	// writeTimeout bounds one write to a client: one that does not read
	// its stream for that long is dropped, never blocking the daemon.
	writeTimeout = 30 * time.Second
	// readHeaderTimeout bounds a client's request headers.
	readHeaderTimeout = 10 * time.Second
)

// Server serves the REST API.
type Server struct {
	boxes   api.Boxes
	handler http.Handler

	// ctx ends at Shutdown: streams (events, logs, attach) watch it.
	ctx    context.Context
	cancel context.CancelFunc
	// streams tracks hijacked connections, which http.Server.Shutdown
	// does not wait for.
	streams sync.WaitGroup

	mu      sync.Mutex
	servers []*http.Server
}

// New returns a server of boxes.
func New(boxes api.Boxes) *Server {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{boxes: boxes, ctx: ctx, cancel: cancel}
	mux := http.NewServeMux()
	for _, r := range s.routes() {
		mux.HandleFunc(r.Method+" "+r.Pattern, r.handle)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(api.CodeNotFound, "no route %s %s", r.Method, r.URL.Path))
	})
	s.handler = recoverPanics(mux)
	return s
}

// Listener is one address the server listens on, with how its clients
// authenticate.
type Listener struct {
	net.Listener
	// Token, when set, is the bearer token every request must carry.
	Token string
}

// Serve serves l until Shutdown. It returns nil after Shutdown.
func (s *Server) Serve(l Listener) error {
	h := s.handler
	if l.Token != "" {
		h = requireToken(l.Token, h)
	}
	hs := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
		ErrorLog:          nil,
	}
	s.mu.Lock()
	s.servers = append(s.servers, hs)
	s.mu.Unlock()
	if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Handler is the API's handler without authentication (for tests).
func (s *Server) Handler() http.Handler { return s.handler }

// Shutdown stops accepting requests, ends the streams and waits (bounded by
// ctx) for the requests in flight.
func (s *Server) Shutdown(ctx context.Context) error {
	s.cancel()
	s.mu.Lock()
	servers := s.servers
	s.mu.Unlock()
	var errs []error
	for _, hs := range servers {
		errs = append(errs, hs.Shutdown(ctx))
	}
	done := make(chan struct{})
	go func() {
		s.streams.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("streams still open: %w", ctx.Err()))
	}
	return errors.Join(errs...)
}

// requireToken refuses a request without the bearer token (401).
func requireToken(token string, next http.Handler) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="boxlite"`)
			msg := "a bearer token is required"
			if len(got) > 0 {
				msg = "wrong bearer token"
			}
			writeError(w, api.Errorf(api.CodeUnauthorized, "%s", msg))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// recoverPanics answers a handler's panic with a 500 {code, message} and
// logs its stack; the client never sees a Go stack.
func recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.G(r.Context()).WithField("panic", v).WithField("stack", string(debug.Stack())).
					Errorf("%s %s panicked", r.Method, r.URL.Path)
				writeError(w, api.Errorf(api.CodeInternal, "internal error serving %s %s", r.Method, r.URL.Path))
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// writeJSON answers status with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// writeError answers err as {code, message} with its status.
func writeError(w http.ResponseWriter, err error) {
	e := api.ErrorOf(err)
	writeJSON(w, e.Status(), e)
}

// decode reads a JSON body into v: bounded, unknown fields refused (naming
// the field), one value only. An empty body leaves v as it is when
// optional.
func decode(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	body := http.MaxBytesReader(w, r.Body, maxBody)
	data, err := io.ReadAll(body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return api.Errorf(api.CodeTooLarge, "request body is over %d bytes", maxBody)
		}
		return api.Errorf(api.CodeInvalidArgument, "reading the request body: %v", err)
	}
	if len(strings.TrimSpace(string(data))) == 0 {
		if optional {
			return nil
		}
		return api.Errorf(api.CodeInvalidArgument, "a JSON body is required")
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return api.Errorf(api.CodeInvalidArgument, "malformed JSON body: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if dec.More() {
		return api.Errorf(api.CodeInvalidArgument, "malformed JSON body: more than one value")
	}
	return nil
}
