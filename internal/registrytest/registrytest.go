// Package registrytest gives a test an OCI registry of its own: Debian's
// docker-registry (distribution 2.8) on 127.0.0.1 with a temporary storage
// directory, and in front of it a proxy that records the requests it
// forwards and can demand credentials or stall blob downloads. Tests push
// to the registry directly and pull through the proxy (Host). The registry
// process is started through the reaper, the one owner of wait in a boxlite
// process, and is stopped and reaped when the test ends.
package registrytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Binary is Debian's docker-registry, which `make setup` installs.
const Binary = "/usr/bin/docker-registry"

// Registry is a docker-registry on 127.0.0.1 with a recording proxy in
// front of it.
type Registry struct {
	// direct is the registry's own host:port, for pushing.
	direct string
	// host is the proxy's host:port, for pulling.
	host string
	// mu guards requests, auth and stall.
	mu sync.Mutex
	// requests are the proxied requests, "METHOD /path". Guarded by mu.
	requests []string
	// auth, if set, is the user:password the proxy demands (HTTP basic).
	// Guarded by mu.
	auth string
	// stall, if not nil, makes the proxy send half of the first chunk of
	// a blob and then hang until the client goes. Guarded by mu.
	stall *stall
}

// stall is one StallBlobs: its channel is closed when the first blob
// stalls.
type stall struct {
	ch   chan struct{}
	once sync.Once
}

// Start starts docker-registry with a temporary storage directory and the
// proxy in front of it, both stopped (the registry reaped, SIGKILLed if
// SIGTERM does not end it) when the test ends. It skips the test when
// docker-registry is not installed.
func Start(t testing.TB) *Registry {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		t.Skipf("requires %s: run sudo make setup (Debian package docker-registry)", Binary)
	}
	direct := startRegistry(t)
	r := &Registry{direct: direct}
	r.host = r.startProxy(t)
	return r
}

// Host is the proxy's address, 127.0.0.1:PORT: the registry to pull from.
func (r *Registry) Host() string { return r.host }

// startRegistry runs docker-registry on a free port of 127.0.0.1 until the
// test ends and returns its address once it answers.
func startRegistry(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	direct := ClosedHost(t)
	config := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "storage"), direct)
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	out := &lockedBuffer{}
	cmd := exec.Command(Binary, "serve", configPath)
	cmd.Stdout, cmd.Stderr = out, out
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatalf("start %s: %v", Binary, err)
	}
	t.Cleanup(func() { stop(t, p, out) })
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	poll.Until(t, "registry answers GET /v2/", func() error {
		if _, done := p.Exit(); done {
			e, _ := p.Wait(context.Background()) // joins the output copy
			t.Fatalf("docker-registry exited (%v) before answering: %s", e, out.String())
		}
		resp, err := client.Get("http://" + direct + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	})
	return direct
}

// stop ends the registry with SIGTERM (SIGKILL after poll.Timeout, an
// error) and waits until it is reaped, so that no process or zombie is left.
func stop(t testing.TB, p *reaper.Process, out *lockedBuffer) {
	p.Signal(syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), poll.Timeout)
	defer cancel()
	if _, err := p.Wait(ctx); err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		t.Errorf("docker-registry did not stop on SIGTERM: %v: %s", err, out.String())
	}
}

// startProxy serves the recording proxy of r.direct on 127.0.0.1 until
// the test ends and returns its address.
func (r *Registry) startProxy(t testing.TB) string {
	target, _ := url.Parse("http://" + r.direct)
	proxy := httputil.NewSingleHostReverseProxy(target)
	transport := &http.Transport{}
	proxy.Transport = transport
	// Tests that cancel pulls make it log "context canceled".
	proxy.ErrorLog = log.New(io.Discard, "", 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.requests = append(r.requests, req.Method+" "+req.URL.Path)
		auth, st := r.auth, r.stall
		r.mu.Unlock()
		if auth != "" {
			user, password, ok := req.BasicAuth()
			if !ok || user+":"+password != auth {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
		}
		if st != nil && req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/") {
			w = &stallWriter{ResponseWriter: w, ctx: req.Context(), stalled: func() { st.once.Do(func() { close(st.ch) }) }}
		}
		proxy.ServeHTTP(w, req)
	}))
	t.Cleanup(func() {
		srv.Close()
		transport.CloseIdleConnections()
	})
	return strings.TrimPrefix(srv.URL, "http://")
}

// TakeRequests returns the requests the proxy forwarded since the last
// call, each "METHOD /path".
func (r *Registry) TakeRequests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.requests
	r.requests = nil
	return out
}

// RequireAuth makes the proxy demand HTTP basic credentials user:password
// from then on.
func (r *Registry) RequireAuth(userPassword string) {
	r.mu.Lock()
	r.auth = userPassword
	r.mu.Unlock()
}

// StallBlobs makes the proxy stall blob downloads halfway from then on: it
// sends half of a blob's first chunk and hangs until the client goes. The
// returned channel is closed when the first blob stalls.
func (r *Registry) StallBlobs() <-chan struct{} {
	st := &stall{ch: make(chan struct{})}
	r.mu.Lock()
	r.stall = st
	r.mu.Unlock()
	return st.ch
}

// stallWriter writes half of the first chunk of a response, then waits
// until the client has gone.
type stallWriter struct {
	http.ResponseWriter
	// ctx is the request's context, done when the client goes.
	ctx context.Context
	// stalled is called once half a chunk is out.
	stalled func()
}

func (w *stallWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p[:len(p)/2])
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	w.stalled()
	<-w.ctx.Done()
	if err == nil {
		err = w.ctx.Err()
	}
	return n, err
}

// ClosedHost returns 127.0.0.1:PORT with a port nothing listened on a
// moment ago: a registry that is unreachable.
func ClosedHost(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// lockedBuffer collects the registry's output, written by exec's copying
// goroutine and read by the test.
type lockedBuffer struct {
	mu sync.Mutex
	// b is the output. Guarded by mu.
	b bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
