package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"go.yaml.in/yaml/v3"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
)

// fakeBoxes is an api.Boxes with one running box "b1" whose process
// prints "out" and "err" and exits with 7.
type fakeBoxes struct {
	mu      sync.Mutex
	calls   []string
	events  chan api.Event
	removed bool
	// stdin is what Attach read from its stdin.
	stdin   bytes.Buffer
	signals []syscall.Signal
	sizes   []api.Size
	// release ends Attach (closed by the test).
	release chan struct{}
	panicOn string
}

func newFake() *fakeBoxes {
	return &fakeBoxes{events: make(chan api.Event, 16), release: make(chan struct{})}
}

func (f *fakeBoxes) call(name, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, name+" "+ref)
	if f.panicOn != "" && strings.HasPrefix(name, f.panicOn) {
		panic("fake panic in " + name)
	}
	if ref != "" && ref != "b1" {
		return fmt.Errorf("no such box: %s: %w", ref, errdefs.ErrNotFound)
	}
	return nil
}

func (f *fakeBoxes) Create(ctx context.Context, req api.CreateRequest) (string, error) {
	if err := f.call("create", ""); err != nil {
		return "", err
	}
	if req.Rootfs == "" {
		return "", fmt.Errorf("a rootfs directory is required: %w", errdefs.ErrInvalidArgument)
	}
	return "b1", nil
}
func (f *fakeBoxes) Start(ctx context.Context, ref string) error {
	if err := f.call("start", ref); err != nil {
		return err
	}
	return fmt.Errorf("box b1 is running: only a created box can be started: %w", errdefs.ErrFailedPrecondition)
}
func (f *fakeBoxes) Stop(ctx context.Context, ref string, req api.StopRequest) error {
	return f.call("stop "+req.Signal+" "+req.Timeout, ref)
}
func (f *fakeBoxes) Kill(ctx context.Context, ref string, req api.KillRequest) error {
	return f.call(fmt.Sprintf("kill %s %v", req.Signal, req.All), ref)
}
func (f *fakeBoxes) Remove(ctx context.Context, ref string, force bool) error {
	return f.call(fmt.Sprintf("remove %v", force), ref)
}
func (f *fakeBoxes) List(ctx context.Context, flt api.ListFilter) ([]api.Box, error) {
	if err := f.call("list "+strings.Join(flt.Status, ",")+" "+strings.Join(flt.Labels, ","), ""); err != nil {
		return nil, err
	}
	return []api.Box{{ID: "b1", Status: "running"}}, nil
}
func (f *fakeBoxes) Inspect(ctx context.Context, ref string) (api.Box, error) {
	if err := f.call("inspect", ref); err != nil {
		return api.Box{}, err
	}
	return api.Box{ID: "b1", Status: "running", Stdin: "/fifo"}, nil
}
func (f *fakeBoxes) Wait(ctx context.Context, ref string) (api.Exit, error) {
	if err := f.call("wait", ref); err != nil {
		return api.Exit{}, err
	}
	return api.Exit{Status: 7}, nil
}
func (f *fakeBoxes) Logs(ctx context.Context, ref string, o api.LogsOptions, stdout, stderr io.Writer) error {
	if err := f.call("logs", ref); err != nil {
		return err
	}
	io.WriteString(stdout, "out\n")
	io.WriteString(stderr, "err\n")
	return nil
}
func (f *fakeBoxes) Attach(ctx context.Context, ref string, stdio api.Stdio) (api.Exit, error) {
	if err := f.call("attach", ref); err != nil {
		return api.Exit{}, err
	}
	io.WriteString(stdio.Stdout, "out\n")
	io.WriteString(stdio.Stderr, "err\n")
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		if stdio.Stdin != nil {
			data, _ := io.ReadAll(stdio.Stdin)
			f.mu.Lock()
			f.stdin.Write(data)
			f.mu.Unlock()
		}
	}()
	for {
		select {
		case sig, ok := <-stdio.Signals:
			if ok {
				f.mu.Lock()
				f.signals = append(f.signals, sig)
				f.mu.Unlock()
			}
		case sz, ok := <-stdio.Resize:
			if ok {
				f.mu.Lock()
				f.sizes = append(f.sizes, sz)
				f.mu.Unlock()
			}
		case <-f.release:
			<-copied
			return api.Exit{Status: 7}, nil
		case <-ctx.Done():
			return api.Exit{}, ctx.Err()
		}
	}
}
func (f *fakeBoxes) Exec(ctx context.Context, ref string, req api.ExecRequest, stdio api.Stdio) (api.Exit, error) {
	if err := f.call("exec "+strings.Join(req.Cmd, " "), ref); err != nil {
		return api.Exit{}, err
	}
	io.WriteString(stdio.Stdout, strings.Join(req.Cmd, " "))
	return api.Exit{Status: 3}, nil
}
func (f *fakeBoxes) Events(ctx context.Context, fn func(api.Event)) error {
	for {
		select {
		case ev := <-f.events:
			fn(ev)
		case <-ctx.Done():
			return nil
		}
	}
}
func (f *fakeBoxes) PullImage(ctx context.Context, ref string) (api.Image, error) {
	if err := f.call("pull", ""); err != nil {
		return api.Image{}, err
	}
	if ref == "bad" {
		return api.Image{}, fmt.Errorf("image %q: invalid reference: %w", ref, errdefs.ErrInvalidArgument)
	}
	return api.Image{Name: "docker.io/library/" + ref + ":latest", Layers: 1}, nil
}
func (f *fakeBoxes) LoadImages(ctx context.Context, r io.Reader) ([]api.Image, error) {
	data, _ := io.ReadAll(r)
	if err := f.call("load "+string(data), ""); err != nil {
		return nil, err
	}
	return []api.Image{{Name: "loaded"}}, nil
}
func (f *fakeBoxes) ListImages(ctx context.Context) ([]api.Image, error) {
	return nil, f.call("images", "")
}
func (f *fakeBoxes) RemoveImage(ctx context.Context, ref string) error {
	if err := f.call("rmi "+ref, ""); err != nil {
		return err
	}
	if ref != "docker.io/library/busybox:latest" {
		return fmt.Errorf("image %s not found: %w", ref, errdefs.ErrNotFound)
	}
	return nil
}
func (f *fakeBoxes) Close() error { return nil }

// serve starts the API of f on a unix socket and returns a client of it.
func serve(t *testing.T, f *fakeBoxes, token string) (*Server, string) {
	t.Helper()
	sock := t.TempDir() + "/api.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := New(f)
	done := make(chan error, 1)
	go func() { done <- s.Serve(Listener{Listener: l, Token: token}) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s, "unix://" + sock
}

func newClient(t *testing.T, url, token string) *client.Client {
	t.Helper()
	c, err := client.New(url, client.Options{Token: token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// docRoutes reads docs/api.yaml and returns "METHOD /path" of every
// operation.
func docRoutes(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile("../../docs/api.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		OpenAPI string                          `yaml:"openapi"`
		Paths   map[string]map[string]yaml.Node `yaml:"paths"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("docs/api.yaml: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("docs/api.yaml: openapi %q, want 3.x", doc.OpenAPI)
	}
	var out []string
	for path, ops := range doc.Paths {
		for method := range ops {
			switch method {
			case "get", "post", "put", "delete", "patch", "head", "options":
				out = append(out, strings.ToUpper(method)+" "+path)
			}
		}
	}
	sort.Strings(out)
	return out
}

func TestEveryRouteIsDocumentedAndEveryDocumentedRouteIsServed(t *testing.T) {
	s := New(newFake())
	routes := s.Routes()
	sort.Strings(routes)
	doc := docRoutes(t)
	for _, r := range routes {
		if !slices.Contains(doc, r) {
			t.Errorf("route %s is not in docs/api.yaml", r)
		}
	}
	for _, d := range doc {
		if !slices.Contains(routes, d) {
			t.Errorf("docs/api.yaml documents %s, which the router does not have", d)
		}
	}
	// Served: a request to each documented route reaches a handler (the
	// mux's own 404 says "no route", its 405 is a Method Not Allowed).
	for _, d := range doc {
		method, path, _ := strings.Cut(d, " ")
		path = strings.ReplaceAll(path, "{id}", "b1")
		path = strings.ReplaceAll(path, "{name}", "busybox")
		req := httptest.NewRequest(method, path, strings.NewReader(`{"cmd":["true"],"ref":"x"}`))
		ctx, cancel := context.WithCancel(context.Background())
		if strings.HasSuffix(path, "/events") || strings.HasSuffix(path, "/logs") {
			cancel() // streams: the answer starts, then the stream ends
		}
		req = req.WithContext(ctx)
		w := httptest.NewRecorder()
		s.Handler().ServeHTTP(w, req)
		cancel()
		if w.Code == http.StatusMethodNotAllowed || strings.Contains(w.Body.String(), "no route") {
			t.Errorf("%s: not served: %d %s", d, w.Code, w.Body)
		}
	}
}

// errorBody checks resp is a JSON {code, message} with status and code.
func errorBody(t *testing.T, resp *http.Response, status int, code string) api.Error {
	t.Helper()
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var e api.Error
	if err := json.Unmarshal(data, &e); err != nil || e.Code == "" || e.Message == "" {
		t.Fatalf("%d %s: not an error body: %v", resp.StatusCode, data, err)
	}
	if resp.StatusCode != status || e.Code != code {
		t.Errorf("got %d %s, want %d %s (%s)", resp.StatusCode, e.Code, status, code, e.Message)
	}
	for _, bad := range []string{"goroutine", "panic(", ".go:"} {
		if strings.Contains(e.Message, bad) {
			t.Errorf("error message leaks internals: %q", e.Message)
		}
	}
	return e
}

func TestBadRequestsAreJSONErrorsWithTheirStatus(t *testing.T) {
	f := newFake()
	s := New(f)
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	do := func(method, path, body string) *http.Response {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	errorBody(t, do("POST", "/v1/boxes", `{"cmd":`), 400, api.CodeInvalidArgument)
	e := errorBody(t, do("POST", "/v1/boxes", `{"cmd":["x"],"rootfs":"/r","colour":"red"}`), 400, api.CodeInvalidArgument)
	if !strings.Contains(e.Message, `"colour"`) {
		t.Errorf("unknown field not named: %q", e.Message)
	}
	errorBody(t, do("POST", "/v1/boxes", ``), 400, api.CodeInvalidArgument)
	errorBody(t, do("POST", "/v1/boxes", `{"cmd":["x"]} {"cmd":["y"]}`), 400, api.CodeInvalidArgument)
	errorBody(t, do("POST", "/v1/boxes", `{"cmd":["x"],"rootfs":"`+strings.Repeat("a", maxBody)+`"}`), 413, api.CodeTooLarge)
	errorBody(t, do("POST", "/v1/boxes", `{"cmd":["x"]}`), 400, api.CodeInvalidArgument)
	errorBody(t, do("GET", "/v1/boxes/nope", ``), 404, api.CodeNotFound)
	errorBody(t, do("DELETE", "/v1/boxes/nope?force=true", ``), 404, api.CodeNotFound)
	errorBody(t, do("DELETE", "/v1/boxes/b1?force=maybe", ``), 400, api.CodeInvalidArgument)
	errorBody(t, do("POST", "/v1/boxes/b1/start", ``), 409, api.CodeConflict)
	errorBody(t, do("GET", "/v1/boxes?status=dead", ``), 400, api.CodeInvalidArgument)
	errorBody(t, do("GET", "/v1/boxes?colour=red", ``), 400, api.CodeInvalidArgument)
	errorBody(t, do("GET", "/v1/boxes/b1/logs?since=yesterday", ``), 400, api.CodeInvalidArgument)
	errorBody(t, do("POST", "/v1/boxes/b1/exec", `{"cmd":["ls"]}`), 400, api.CodeInvalidArgument) // no upgrade
	errorBody(t, do("POST", "/v1/boxes/b1/exec", `{}`), 400, api.CodeInvalidArgument)
	errorBody(t, do("GET", "/v2/anything", ``), 404, api.CodeNotFound)
	errorBody(t, do("PUT", "/v1/boxes", ``), 404, api.CodeNotFound)

	f.panicOn = "list"
	e = errorBody(t, do("GET", "/v1/boxes", ``), 500, api.CodeInternal)
	if strings.Contains(e.Message, "fake panic") {
		t.Errorf("panic value leaked to the client: %q", e.Message)
	}
}

func TestTheClientSpeaksTheWholeAPI(t *testing.T) {
	f := newFake()
	_, url := serve(t, f, "")
	c := newClient(t, url, "")
	ctx := context.Background()
	id, err := c.Create(ctx, api.CreateRequest{Rootfs: "/r", Cmd: []string{"true"}})
	if err != nil || id != "b1" {
		t.Fatalf("create: %q %v", id, err)
	}
	if _, err := c.Create(ctx, api.CreateRequest{Cmd: []string{"true"}}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("create without rootfs: %v, want invalid argument", err)
	}
	if err := c.Start(ctx, "b1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("start: %v, want a failed precondition (409)", err)
	}
	if _, err := c.Inspect(ctx, "nope"); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "no such box: nope") {
		t.Errorf("inspect nope: %v, want not found naming it", err)
	}
	boxes, err := c.List(ctx, api.ListFilter{Status: []string{"running"}, Labels: []string{"a=b"}})
	if err != nil || len(boxes) != 1 || boxes[0].ID != "b1" {
		t.Errorf("list: %v %v", boxes, err)
	}
	if err := c.Kill(ctx, "b1", api.KillRequest{Signal: "KILL", All: true}); err != nil {
		t.Error(err)
	}
	if err := c.Stop(ctx, "b1", api.StopRequest{Timeout: "3s"}); err != nil {
		t.Error(err)
	}
	if e, err := c.Wait(ctx, "b1"); err != nil || e.Status != 7 {
		t.Errorf("wait: %v %v", e, err)
	}
	var out, errOut bytes.Buffer
	if err := c.Logs(ctx, "b1", api.LogsOptions{Since: time.Now()}, &out, &errOut); err != nil || out.String() != "out\n" || errOut.String() != "err\n" {
		t.Errorf("logs: %q %q %v", out.String(), errOut.String(), err)
	}
	out.Reset()
	if e, err := c.Exec(ctx, "b1", api.ExecRequest{Cmd: []string{"echo", "hi"}}, api.Stdio{Stdout: &out}); err != nil || e.Status != 3 || out.String() != "echo hi" {
		t.Errorf("exec: %v %v %q", e, err, out.String())
	}
	if err := c.Remove(ctx, "b1", true); err != nil {
		t.Error(err)
	}
	if img, err := c.PullImage(ctx, "busybox"); err != nil || img.Name != "docker.io/library/busybox:latest" {
		t.Errorf("pull: %v %v", img, err)
	}
	if _, err := c.PullImage(ctx, "bad"); !errdefs.IsInvalidArgument(err) {
		t.Errorf("pull bad: %v", err)
	}
	if imgs, err := c.LoadImages(ctx, strings.NewReader("TARBALL")); err != nil || len(imgs) != 1 {
		t.Errorf("load: %v %v", imgs, err)
	}
	if imgs, err := c.ListImages(ctx); err != nil || imgs == nil || len(imgs) != 0 {
		t.Errorf("images: %#v %v", imgs, err)
	}
	// A name with slashes and a colon travels as one path segment.
	if err := c.RemoveImage(ctx, "docker.io/library/busybox:latest"); err != nil {
		t.Errorf("rmi: %v", err)
	}
	if err := c.RemoveImage(ctx, "nope"); !errdefs.IsNotFound(err) {
		t.Errorf("rmi nope: %v", err)
	}
	f.mu.Lock()
	calls := strings.Join(f.calls, "\n")
	f.mu.Unlock()
	for _, want := range []string{"load TARBALL", "rmi docker.io/library/busybox:latest", "list running a=b b1", "list running a=b ", "kill KILL true b1", "stop  3s b1", "remove true b1", "logs b1", "exec echo hi b1"} {
		if !strings.Contains(calls, strings.TrimSuffix(want, " b1")) {
			t.Errorf("call %q not made; calls:\n%s", want, calls)
		}
	}
}

func TestAttachRelaysStdinSignalsAndSizesAndEndsWithTheExit(t *testing.T) {
	f := newFake()
	_, url := serve(t, f, "")
	c := newClient(t, url, "")
	sigs := make(chan syscall.Signal, 1)
	sizes := make(chan api.Size, 1)
	sigs <- syscall.SIGINT
	sizes <- api.Size{Width: 80, Height: 24}
	var out, errOut bytes.Buffer
	go func() {
		// The fake ends Attach once it saw stdin end, the signal and the size.
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			f.mu.Lock()
			ok := f.stdin.String() == "hello" && len(f.signals) == 1 && len(f.sizes) == 1
			f.mu.Unlock()
			if ok {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		close(f.release)
	}()
	e, err := c.Attach(context.Background(), "b1", api.Stdio{
		Stdin: strings.NewReader("hello"), Stdout: &out, Stderr: &errOut, Signals: sigs, Resize: sizes,
	})
	if err != nil || e.Status != 7 {
		t.Fatalf("attach: %v %v", e, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stdin.String() != "hello" || !slices.Equal(f.signals, []syscall.Signal{syscall.SIGINT}) || len(f.sizes) != 1 || f.sizes[0].Width != 80 {
		t.Errorf("relayed stdin %q, signals %v, sizes %v", f.stdin.String(), f.signals, f.sizes)
	}
	if out.String() != "out\n" || errOut.String() != "err\n" {
		t.Errorf("output %q %q", out.String(), errOut.String())
	}
}

func TestEventsStreamAndAClientThatLeavesIsForgotten(t *testing.T) {
	f := newFake()
	_, url := serve(t, f, "")
	c := newClient(t, url, "")
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan api.Event, 4)
	done := make(chan error, 1)
	go func() { done <- c.Events(ctx, func(ev api.Event) { got <- ev }) }()
	f.events <- api.Event{Topic: "/tasks/exit", ID: "b1", Exited: true, ExitStatus: 137, Time: time.Now()}
	select {
	case ev := <-got:
		if ev.ID != "b1" || ev.ExitStatus != 137 || !ev.Exited {
			t.Errorf("event %+v", ev)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no event")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("events after cancel: %v", err)
	}
}

func TestATCPListenerNeedsTheToken(t *testing.T) {
	f := newFake()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(f)
	go s.Serve(Listener{Listener: l, Token: "s3cret"})
	defer s.Shutdown(context.Background())
	url := "tcp://" + l.Addr().String()
	ctx := context.Background()
	for _, token := range []string{"", "wrong"} {
		_, err := newClient(t, url, token).List(ctx, api.ListFilter{})
		var e *api.Error
		if !errorsAs(err, &e) || e.Code != api.CodeUnauthorized {
			t.Errorf("token %q: %v, want unauthorized", token, err)
		}
	}
	if _, err := newClient(t, url, "s3cret").List(ctx, api.ListFilter{}); err != nil {
		t.Errorf("with the token: %v", err)
	}
	resp, err := http.Get("http://" + l.Addr().String() + "/v1/boxes")
	if err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get("WWW-Authenticate") == "" {
		t.Error("401 without WWW-Authenticate")
	}
	errorBody(t, resp, 401, api.CodeUnauthorized)
}

func errorsAs(err error, target **api.Error) bool {
	e, ok := err.(*api.Error)
	if ok {
		*target = e
	}
	return ok
}
