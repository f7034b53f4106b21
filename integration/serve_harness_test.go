package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Bounds of the daemon harness.
const (
	// daemonReadyTimeout bounds a daemon's start until it answers.
	daemonReadyTimeout = 30 * time.Second
	// daemonStopTimeout bounds a daemon's exit after SIGTERM (its own
	// shutdown is bounded by 15 s, plus 10 s per box with
	// --stop-boxes-on-exit).
	daemonStopTimeout = time.Minute
	// boxTimeout bounds one box operation through the daemon (a VM boots
	// under TCG, slowly when several boot at once).
	boxTimeout = 3 * time.Minute
)

// faultNoReap is the daemon environment that makes its reaper a subreaper
// that never reaps (fault injection: reaper.FaultNoReapEnv).
const faultNoReap = reaper.FaultNoReapEnv + "=1"

// daemon is one `boxlite serve` started by a test on its manager's state
// directory.
type daemon struct {
	t testing.TB
	m *mgr
	// sock is the unix socket it serves; url is sock as a client URL.
	sock, url string
	// env is the extra environment it was started with.
	env []string
	p   *reaper.Process
	// out collects its stdout and stderr (its log).
	out *lockedBuffer
	// c is a client of sock.
	c *client.Client
	// stopped says stop already ran.
	stopped bool
}

// serve starts `boxlite --state <state> serve --listen unix://<state>/api.sock
// [flags]` with env added to the test's environment, waits until it answers
// GET /v1/version and returns it. Its cleanup, registered after newMgr's leak
// check and so run before it, force-removes any box left (an error unless
// the test failed already) and stops the daemon.
func (m *mgr) serve(env []string, flags ...string) *daemon {
	m.t.Helper()
	t := m.t
	d := &daemon{t: t, m: m, sock: filepath.Join(m.state, "api.sock"), env: env, out: &lockedBuffer{}}
	d.url = "unix://" + d.sock
	args := append([]string{"serve", "--listen", d.url}, flags...)
	cmd := m.command(args...)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = d.out, d.out
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatalf("start boxlite serve: %v", err)
	}
	d.p = p
	t.Cleanup(d.cleanup)
	c, err := client.New(d.url, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d.c = c
	hc := unixHTTPClient(d.sock)
	deadline := time.Now().Add(daemonReadyTimeout)
	for {
		resp, err := hc.Get("http://boxlite/v1/version")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.Contains(string(body), `"api_version"`) {
				return d
			}
			err = fmt.Errorf("GET /v1/version: %s %q", resp.Status, body)
		}
		select {
		case <-p.Done():
			e, _ := p.Exit()
			t.Fatalf("boxlite serve exited (%v) before answering: %s", e, clipStr(d.out.String()))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("boxlite serve never answered on %s: %v: %s", d.sock, err, clipStr(d.out.String()))
		}
	}
}

// Pid is the daemon's pid.
func (d *daemon) Pid() int { return d.p.Pid() }

// faulty says the daemon runs with the no-reap fault injection.
func (d *daemon) faulty() bool { return slices.Contains(d.env, faultNoReap) }

// log returns the tail of the daemon's log, for failure messages.
func (d *daemon) log() string {
	s := d.out.String()
	if len(s) > 3000 {
		s = "..." + s[len(s)-3000:]
	}
	return s
}

// stop sends SIGTERM and fails the test unless the daemon exits 0 within
// daemonStopTimeout (then it is killed).
func (d *daemon) stop() {
	d.t.Helper()
	if d.stopped {
		return
	}
	d.stopped = true
	d.c.Close()
	d.p.Signal(syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), daemonStopTimeout)
	defer cancel()
	e, err := d.p.Wait(ctx)
	if err != nil {
		d.p.Signal(syscall.SIGKILL)
		d.p.Wait(context.Background())
		d.t.Errorf("boxlite serve did not exit within %v of SIGTERM: %s", daemonStopTimeout, d.log())
		return
	}
	if e.Status != 0 {
		d.t.Errorf("boxlite serve exited %v after SIGTERM, want 0: %s", e, d.log())
	}
}

// cleanup force-removes the boxes the test left (not through a daemon that
// cannot reap: the manager's leak check removes those once it is gone),
// then stops the daemon.
func (d *daemon) cleanup() {
	t := d.t
	if !d.stopped && !d.faulty() {
		ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
		boxes, err := d.c.List(ctx, api.ListFilter{})
		if err != nil {
			t.Errorf("list boxes at cleanup: %v", err)
		}
		for _, b := range boxes {
			if !t.Failed() {
				t.Errorf("leak: box %s (%s) left by the test", b.ID, b.Status)
			}
			if err := d.c.Remove(ctx, b.ID, true); err != nil {
				t.Errorf("force-remove box %s at cleanup: %v", b.ID, err)
			}
		}
		cancel()
	}
	d.stop()
	if t.Failed() {
		// The test failed half-way: remove what it left locally, so that
		// the leak check reports processes, not the boxes again.
		if _, err := os.Stat(d.m.state); err == nil {
			for _, id := range strings.Fields(d.m.run(nil, "ps", "-q").stdout) {
				d.m.run(nil, "rm", "--force", id)
			}
		}
	}
	if t.Failed() {
		t.Logf("boxlite serve log:\n%s", d.log())
	}
}

// unixHTTPClient is a plain HTTP client of the daemon's unix socket (any
// host name), without keep-alive so that it holds no connection between
// requests.
func unixHTTPClient(sock string) *http.Client {
	return &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
			DisableKeepAlives: true,
		},
	}
}

// procStatus returns the State: and PPid: lines of /proc/<pid>/status on
// one line, or "gone".
func procStatus(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "gone"
	}
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "State:") || strings.HasPrefix(l, "PPid:") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, ", ")
}

// isZombieOf says procStatus reads a zombie whose parent is ppid.
func isZombieOf(status string, ppid int) bool {
	return strings.Contains(status, "State: Z") && strings.Contains(status, "PPid: "+strconv.Itoa(ppid))
}

// within calls cond until it returns nil or d passed, and returns its last
// error.
func within(d time.Duration, cond func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// goneWithin waits until /proc/<pid> is gone (not even a zombie) and fails
// the test with its State and PPid otherwise.
func goneWithin(t testing.TB, what string, pid int, d time.Duration) {
	t.Helper()
	if err := within(d, func() error {
		if st := procStatus(pid); st != "gone" {
			return fmt.Errorf("%s", st)
		}
		return nil
	}); err != nil {
		t.Errorf("%s pid %d still present %v later: %v", what, pid, d, err)
	}
}

// serveBox creates and starts a box running cmd (with req's other fields)
// through c and returns its record.
func serveBox(t testing.TB, c api.Boxes, req api.CreateRequest) api.Box {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	id, err := c.Create(ctx, req)
	if err != nil {
		t.Fatalf("create box %v: %v", req.Cmd, err)
	}
	if err := c.Start(ctx, id); err != nil {
		t.Fatalf("start box %s: %v", id, err)
	}
	b, err := c.Inspect(ctx, id)
	if err != nil {
		t.Fatalf("inspect box %s: %v", id, err)
	}
	if b.Status != "running" || b.ShimPid <= 0 || b.VMMPid <= 0 {
		t.Fatalf("box %s after start: status %s, shim pid %d, VMM pid %d", id, b.Status, b.ShimPid, b.VMMPid)
	}
	return b
}

// sleepBox is a box running sleep 1000 on rootfs.
func sleepBox(rootfs string) api.CreateRequest {
	return api.CreateRequest{Rootfs: rootfs, Cmd: []string{"sleep", "1000"}}
}

// apiEvents subscribes to a daemon's events until the test ends and keeps
// every one.
type apiEvents struct {
	ch chan api.Event
	// errc gets Events' return.
	errc chan error
}

// subscribe opens GET /v1/events through c; the stream ends with the test.
func subscribe(t testing.TB, c api.Boxes) *apiEvents {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	el := &apiEvents{ch: make(chan api.Event, 1024), errc: make(chan error, 1)}
	go func() {
		el.errc <- c.Events(ctx, func(ev api.Event) {
			select {
			case el.ch <- ev:
			default:
				t.Errorf("event log full: dropped %v", ev)
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-el.errc:
		case <-time.After(10 * time.Second):
			t.Errorf("events subscription did not end within 10s of its cancel")
		}
	})
	return el
}

// next returns the next event of box id with topic (any topic when ""),
// collecting every event seen on the way into seen; it fails the test
// after timeout.
func (el *apiEvents) next(t testing.TB, topic, id string, timeout time.Duration, seen *[]api.Event) api.Event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev := <-el.ch:
			if seen != nil {
				*seen = append(*seen, ev)
			}
			if ev.ID == id && (topic == "" || ev.Topic == topic) {
				return ev
			}
		case err := <-el.errc:
			el.errc <- err
			t.Fatalf("events stream ended before %s of %s: %v", topic, id, err)
		case <-deadline:
			t.Fatalf("no %s event of box %s within %v", topic, id, timeout)
		}
	}
}

// apiErrorBody parses an error answer's body: it must be exactly
// {code, message}, without a Go stack or panic.
func apiErrorBody(t testing.TB, what string, body []byte) api.Error {
	t.Helper()
	var e api.Error
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil || e.Code == "" || e.Message == "" {
		t.Errorf("%s: error body %q is not {code, message}: %v", what, body, err)
	}
	for _, bad := range []string{"goroutine", "panic"} {
		if strings.Contains(string(body), bad) {
			t.Errorf("%s: error body mentions %q: %q", what, bad, body)
		}
	}
	return e
}
