package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/api"
)

// APIVersion is the version GET /v1/version reports.
const APIVersion = "1"

// route is one entry of the router; docs/api.yaml documents each one (a
// test holds them equal).
type route struct {
	Method, Pattern string
	handle          http.HandlerFunc
}

// routes lists the API.
func (s *Server) routes() []route {
	return []route{
		{"GET", "/v1/version", s.version},
		{"POST", "/v1/boxes", s.create},
		{"GET", "/v1/boxes", s.list},
		{"GET", "/v1/boxes/{id}", s.inspect},
		{"DELETE", "/v1/boxes/{id}", s.remove},
		{"POST", "/v1/boxes/{id}/start", s.start},
		{"POST", "/v1/boxes/{id}/stop", s.stop},
		{"POST", "/v1/boxes/{id}/kill", s.kill},
		{"POST", "/v1/boxes/{id}/wait", s.wait},
		{"GET", "/v1/boxes/{id}/logs", s.logs},
		{"POST", "/v1/boxes/{id}/attach", s.attach},
		{"POST", "/v1/boxes/{id}/exec", s.exec},
		{"GET", "/v1/events", s.events},
		{"POST", "/v1/images/pull", s.pullImage},
		{"POST", "/v1/images/load", s.loadImages},
		{"GET", "/v1/images", s.listImages},
		{"DELETE", "/v1/images/{name}", s.removeImage},
	}
}

// Routes returns "METHOD PATTERN" of every route (for the document test).
func (s *Server) Routes() []string {
	var out []string
	for _, r := range s.routes() {
		out = append(out, r.Method+" "+r.Pattern)
	}
	return out
}

func (s *Server) version(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"api_version": APIVersion})
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	var req api.CreateRequest
	if err := decode(w, r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	id, err := s.boxes.Create(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, api.CreateResponse{ID: id})
}

// statuses are the values the status filter accepts.
var statuses = map[string]bool{"created": true, "running": true, "paused": true, "stopped": true, "unknown": true}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var f api.ListFilter
	for _, v := range q["status"] {
		for _, st := range strings.Split(v, ",") {
			if !statuses[st] {
				writeError(w, api.Errorf(api.CodeInvalidArgument, "status %q: want created, running, paused, stopped or unknown", st))
				return
			}
			f.Status = append(f.Status, st)
		}
	}
	f.Labels = q["label"]
	for k := range q {
		if k != "status" && k != "label" {
			writeError(w, api.Errorf(api.CodeInvalidArgument, "unknown query parameter %q", k))
			return
		}
	}
	boxes, err := s.boxes.List(r.Context(), f)
	if err != nil && boxes == nil {
		writeError(w, err)
		return
	}
	if err != nil {
		log.G(r.Context()).WithError(err).Warn("list: some boxes could not be read")
	}
	writeJSON(w, http.StatusOK, boxes)
}

func (s *Server) inspect(w http.ResponseWriter, r *http.Request) {
	b, err := s.boxes.Inspect(r.Context(), r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, b)
}

func (s *Server) remove(w http.ResponseWriter, r *http.Request) {
	force := false
	if v := r.URL.Query().Get("force"); v != "" {
		var err error
		if force, err = strconv.ParseBool(v); err != nil {
			writeError(w, api.Errorf(api.CodeInvalidArgument, "force=%q: want true or false", v))
			return
		}
	}
	// The removal outlives a client that goes away: half a teardown helps
	// nobody.
	if err := s.boxes.Remove(context.WithoutCancel(r.Context()), r.PathValue("id"), force); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) start(w http.ResponseWriter, r *http.Request) {
	if err := decode(w, r, &struct{}{}, true); err != nil {
		writeError(w, err)
		return
	}
	if err := s.boxes.Start(r.Context(), r.PathValue("id")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) stop(w http.ResponseWriter, r *http.Request) {
	var req api.StopRequest
	if err := decode(w, r, &req, true); err != nil {
		writeError(w, err)
		return
	}
	if err := s.boxes.Stop(context.WithoutCancel(r.Context()), r.PathValue("id"), req); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request) {
	var req api.KillRequest
	if err := decode(w, r, &req, true); err != nil {
		writeError(w, err)
		return
	}
	if err := s.boxes.Kill(r.Context(), r.PathValue("id"), req); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) wait(w http.ResponseWriter, r *http.Request) {
	e, err := s.boxes.Wait(r.Context(), r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, e)
}

// deadlineWriter sets a write deadline before each write so that a client
// that stops reading is dropped, and flushes after each.
type deadlineWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (d deadlineWriter) Write(p []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	n, err := d.w.Write(p)
	if err == nil {
		err = d.rc.Flush()
	}
	return n, err
}

// lockedWriter serializes writes to one stream from two goroutines.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var o api.LogsOptions
	if v := q.Get("follow"); v != "" {
		f, err := strconv.ParseBool(v)
		if err != nil {
			writeError(w, api.Errorf(api.CodeInvalidArgument, "follow=%q: want true or false", v))
			return
		}
		o.Follow = f
	}
	if v := q.Get("since"); v != "" {
		t, err := api.ParseSince(v, time.Now())
		if err != nil {
			writeError(w, err)
			return
		}
		o.Since = t
	}
	// Find the box before the 200 goes out, so an unknown one is a 404.
	if _, err := s.boxes.Inspect(r.Context(), r.PathValue("id")); err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", api.StreamContentType)
	w.WriteHeader(http.StatusOK)
	out := deadlineWriter{w: w, rc: http.NewResponseController(w)}
	var mu sync.Mutex
	stdout := lockedWriter{&mu, api.FrameWriter{W: out, Type: api.FrameStdout}}
	stderr := lockedWriter{&mu, api.FrameWriter{W: out, Type: api.FrameStderr}}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()
	if err := s.boxes.Logs(ctx, r.PathValue("id"), o, stdout, stderr); err != nil && ctx.Err() == nil {
		data, _ := json.Marshal(api.ErrorOf(err))
		mu.Lock()
		api.WriteFrame(out, api.FrameError, data)
		mu.Unlock()
	}
}

func (s *Server) attach(w http.ResponseWriter, r *http.Request) {
	if err := decode(w, r, &struct{}{}, true); err != nil {
		writeError(w, err)
		return
	}
	id := r.PathValue("id")
	b, err := s.boxes.Inspect(r.Context(), id)
	if err != nil {
		writeError(w, err)
		return
	}
	s.upgrade(w, r, b.Stdin != "", func(ctx context.Context, stdio api.Stdio) (api.Exit, error) {
		return s.boxes.Attach(ctx, id, stdio)
	})
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	var req api.ExecRequest
	if err := decode(w, r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	if len(req.Cmd) == 0 {
		writeError(w, api.Errorf(api.CodeInvalidArgument, "cmd is required"))
		return
	}
	id := r.PathValue("id")
	b, err := s.boxes.Inspect(r.Context(), id)
	if err != nil {
		writeError(w, err)
		return
	}
	if b.Status != "running" {
		writeError(w, api.Errorf(api.CodeConflict, "box %s is not running (%s)", id, b.Status))
		return
	}
	s.upgrade(w, r, req.Stdin, func(ctx context.Context, stdio api.Stdio) (api.Exit, error) {
		return s.boxes.Exec(ctx, id, req, stdio)
	})
}

// upgrade switches the connection to the stdio stream protocol and runs fn
// with the client's stdin, sizes and signals, sending its output and,
// last, its exit (or error). Without stdin, stdin frames are dropped.
func (s *Server) upgrade(w http.ResponseWriter, r *http.Request, stdin bool, fn func(context.Context, api.Stdio) (api.Exit, error)) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), api.UpgradeProtocol) {
		writeError(w, api.Errorf(api.CodeInvalidArgument, "this call needs a connection upgraded to %s (Connection: Upgrade, Upgrade: %s)", api.UpgradeProtocol, api.UpgradeProtocol))
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		writeError(w, fmt.Errorf("cannot take over the connection: %w", err))
		return
	}
	s.streams.Add(1)
	defer s.streams.Done()
	defer conn.Close()
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", api.UpgradeProtocol)
	if err := brw.Flush(); err != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()

	out := &connWriter{conn: conn}
	stdinR, stdinW := io.Pipe()
	resize := make(chan api.Size, 8)
	signals := make(chan syscall.Signal, 8)
	go readClient(brw.Reader, stdinW, stdin, resize, signals, cancel)
	var in io.Reader
	if stdin {
		in = stdinR
	}
	exit, err := fn(ctx, api.Stdio{
		Stdin:  in,
		Stdout: api.FrameWriter{W: out, Type: api.FrameStdout},
		Stderr: api.FrameWriter{W: out, Type: api.FrameStderr},
		Resize: resize, Signals: signals,
	})
	stdinR.Close()
	if err != nil {
		data, _ := json.Marshal(api.ErrorOf(err))
		api.WriteFrame(out, api.FrameError, data)
		return
	}
	data, _ := json.Marshal(exit)
	api.WriteFrame(out, api.FrameExit, data)
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// connWriter writes frames to a hijacked connection, one at a time, each
// bounded by writeTimeout.
type connWriter struct {
	mu   sync.Mutex
	conn net.Conn
}

func (c *connWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	return c.conn.Write(p)
}

// readClient reads the client's frames: stdin into stdin, sizes and
// signals into their channels. The connection closing ends stdin and
// cancels the call (a client that went away detaches).
func readClient(r *bufio.Reader, stdin *io.PipeWriter, stdinOpen bool, resize chan<- api.Size, signals chan<- syscall.Signal, cancel context.CancelFunc) {
	defer close(resize)
	defer close(signals)
	for {
		typ, payload, err := api.ReadFrame(r)
		if err != nil {
			stdin.CloseWithError(io.EOF)
			cancel()
			return
		}
		switch typ {
		case api.FrameStdin:
			if stdinOpen {
				if _, err := stdin.Write(payload); err != nil {
					stdinOpen = false
				}
			}
		case api.FrameStdinEOF:
			stdin.Close()
			stdinOpen = false
		case api.FrameResize:
			var sz api.Size
			if json.Unmarshal(payload, &sz) == nil && sz.Width > 0 && sz.Height > 0 {
				select {
				case resize <- sz:
				default:
				}
			}
		case api.FrameSignal:
			if sig, err := api.ParseSignal(string(payload), 0); err == nil && sig != 0 {
				select {
				case signals <- sig:
				default:
				}
			}
		}
	}
}

func (s *Server) pullImage(w http.ResponseWriter, r *http.Request) {
	var req api.PullRequest
	if err := decode(w, r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	if req.Ref == "" {
		writeError(w, api.Errorf(api.CodeInvalidArgument, "ref is required"))
		return
	}
	img, err := s.boxes.PullImage(r.Context(), req.Ref)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

// loadImages imports the tarball in the body (no size bound: images are
// big; the store writes it to disk as it comes).
func (s *Server) loadImages(w http.ResponseWriter, r *http.Request) {
	imgs, err := s.boxes.LoadImages(r.Context(), r.Body)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, imgs)
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	imgs, err := s.boxes.ListImages(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	if imgs == nil {
		imgs = []api.Image{}
	}
	writeJSON(w, http.StatusOK, imgs)
}

func (s *Server) removeImage(w http.ResponseWriter, r *http.Request) {
	if err := s.boxes.RemoveImage(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
