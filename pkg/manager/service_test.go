package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/api"
)

// The Service tests drive the fake shim (fakeshim_test.go): it runs no VM,
// but it writes the framed log and reads the stdin FIFO the Service gives
// it, publishes exits and is bootstrapped, shut down and reaped like the
// real shim. What needs a guest is left to the integration tests:
// terminals (the fake's ResizePty does nothing), a real process's signal
// handling, OOM kills and health checks.

// newTestService returns a Service on a fresh state directory that
// bootstraps the fake shim: a daemon one or a local one (the CLI's). It is
// closed when the test ends; then no goroutine, descriptor or shim the
// test started may be left.
func newTestService(t *testing.T, daemon bool) *Service {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
	t.Cleanup(func() { assertNoChildren(t) })
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewService(ServiceConfig{
		Config: Config{StateRoot: filepath.Join(shortDir(t), "st"), ShimBinary: self, Self: self},
		Daemon: daemon,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

// inBothModes runs test against a local and a daemon Service.
func inBothModes(t *testing.T, test func(t *testing.T, s *Service)) {
	for _, daemon := range []bool{false, true} {
		name := "local"
		if daemon {
			name = "daemon"
		}
		t.Run(name, func(t *testing.T) { test(t, newTestService(t, daemon)) })
	}
}

// testContext bounds one test's calls.
func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), poll.Timeout)
	t.Cleanup(cancel)
	return ctx
}

// testRequest asks for a box running the fake process args.
func testRequest(t *testing.T, args ...string) api.CreateRequest {
	t.Helper()
	return api.CreateRequest{Rootfs: newTestRootfs(t), Cmd: args}
}

// mustCreate creates a box, force-removed when the test ends (before the
// service closes) unless the test removed it.
func mustCreate(t *testing.T, s *Service, req api.CreateRequest) string {
	t.Helper()
	id, err := s.Create(testContext(t), req)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Remove(context.Background(), id, true); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("cleanup: remove %s: %v", id, err)
		}
	})
	return id
}

// mustRun creates and starts a box.
func mustRun(t *testing.T, s *Service, req api.CreateRequest) string {
	t.Helper()
	id := mustCreate(t, s, req)
	if err := s.Start(testContext(t), id); err != nil {
		t.Fatalf("start: %v", err)
	}
	return id
}

// logs returns a box's logged output, by stream.
func logs(t *testing.T, s *Service, id string, o api.LogsOptions) (string, string) {
	t.Helper()
	var out, errOut syncBuffer
	if err := s.Logs(testContext(t), id, o, &out, &errOut); err != nil {
		t.Fatalf("logs: %v", err)
	}
	return out.String(), errOut.String()
}

// assertGone fails the test unless box id, its directory and its shim are
// gone.
func assertGone(t *testing.T, s *Service, id string, rec api.Box) {
	t.Helper()
	if _, err := s.Inspect(testContext(t), id); !errdefs.IsNotFound(err) {
		t.Errorf("inspect after remove: %v, want not found", err)
	}
	if _, err := os.Stat(s.Manager().Store().BoxDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("box directory left: %v", err)
	}
	if ok, _ := (Record{ShimPid: rec.ShimPid, ShimStartTime: rec.ShimStartTime}).ShimIdentity().Exists(); ok {
		t.Errorf("shim pid %d still present", rec.ShimPid)
	}
	if entries, _ := os.ReadDir(s.Manager().Store().SocketDir()); len(entries) > 0 {
		t.Errorf("socket left: %s", entries[0].Name())
	}
	if w := s.takeStdin(id); w != nil {
		w.Close()
		t.Error("the service still holds the box's stdin")
	}
}

func TestServiceAttachRelaysOutputByStreamAndTheExit(t *testing.T) {
	s := newTestService(t, false)
	id := mustRun(t, s, testRequest(t, "exit", "3"))
	// Attach reads the output from the start, so a second attach after
	// the exit sees the same.
	for _, attempt := range []string{"first", "after the exit"} {
		var out, errOut syncBuffer
		exit, err := s.Attach(testContext(t), id, api.Stdio{Stdout: &out, Stderr: &errOut})
		if err != nil {
			t.Fatalf("%s attach: %v", attempt, err)
		}
		if exit.Status != 3 || exit.At.IsZero() {
			t.Errorf("%s attach: exit %+v, want 3 with a time", attempt, exit)
		}
		if out.String() != "bye\n" || errOut.String() != "oops\n" {
			t.Errorf("%s attach: stdout %q, stderr %q: want bye and oops, kept apart", attempt, out.String(), errOut.String())
		}
	}
	if b, err := s.Inspect(testContext(t), id); err != nil || b.Status != string(StatusStopped) || b.ExitStatus != 3 {
		t.Errorf("inspect: %s %d, %v: want stopped 3", b.Status, b.ExitStatus, err)
	}
	if err := s.Remove(testContext(t), id, false); err != nil {
		t.Fatalf("remove a stopped box: %v", err)
	}
}

func TestServiceAttachRelaysStdinHeldSinceCreate(t *testing.T) {
	s := newTestService(t, false)
	req := testRequest(t, "cat")
	req.OpenStdin = true
	id := mustRun(t, s, req)
	var out syncBuffer
	exit, err := s.Attach(testContext(t), id, api.Stdio{Stdin: strings.NewReader("hello\nworld\n"), Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	// cat exits when its stdin ends: the end of the caller's stdin closed
	// the FIFO the service held.
	if exit.Status != 0 || out.String() != "hello\nworld\n" {
		t.Errorf("exit %d, stdout %q: want 0 and the stdin echoed", exit.Status, out.String())
	}
	if w := s.takeStdin(id); w != nil {
		w.Close()
		t.Error("the service still holds the stdin the attach took")
	}
}

func TestServiceAttachForwardsSignals(t *testing.T) {
	s := newTestService(t, false)
	id := mustRun(t, s, testRequest(t, "trap"))
	sigs := make(chan syscall.Signal, 1)
	sigs <- syscall.SIGINT
	var out, errOut syncBuffer
	exit, err := s.Attach(testContext(t), id, api.Stdio{Stdout: &out, Stderr: &errOut, Signals: sigs})
	if err != nil {
		t.Fatal(err)
	}
	if exit.Status != 128+uint32(syscall.SIGINT) || out.String() != "ready\n" || errOut.String() != "trapped\n" {
		t.Errorf("exit %d, stdout %q, stderr %q: want 130 after the forwarded SIGINT", exit.Status, out.String(), errOut.String())
	}
}

func TestServiceLogsSinceSkipsEarlierOutputAndFollowEndsWithTheProcess(t *testing.T) {
	s := newTestService(t, false)
	id := mustRun(t, s, testRequest(t, "trap"))
	poll.Until(t, "the box's first output", func() error {
		if out, _ := logs(t, s, id, api.LogsOptions{}); out != "ready\n" {
			return fmt.Errorf("stdout %q", out)
		}
		return nil
	})
	since := time.Now()
	type result struct {
		out, errOut string
		err         error
	}
	followed := make(chan result, 1)
	go func() {
		var out, errOut syncBuffer
		err := s.Logs(testContext(t), id, api.LogsOptions{Follow: true}, &out, &errOut)
		followed <- result{out.String(), errOut.String(), err}
	}()
	if err := s.Kill(testContext(t), id, api.KillRequest{Signal: "TERM"}); err != nil {
		t.Fatal(err)
	}
	if exit, err := s.Wait(testContext(t), id); err != nil || exit.Status != 143 {
		t.Fatalf("wait: %+v, %v: want 143", exit, err)
	}
	select {
	case r := <-followed:
		if r.err != nil || r.out != "ready\n" || r.errOut != "trapped\n" {
			t.Errorf("follow: stdout %q, stderr %q, %v: want all the output", r.out, r.errOut, r.err)
		}
	case <-time.After(poll.Timeout):
		t.Fatal("logs --follow did not end when the process exited")
	}
	tests := []struct {
		name           string
		o              api.LogsOptions
		stdout, stderr string
	}{
		{"everything", api.LogsOptions{}, "ready\n", "trapped\n"},
		{"since between the two", api.LogsOptions{Since: since}, "", "trapped\n"},
		{"since after the last", api.LogsOptions{Since: time.Now().Add(time.Hour)}, "", ""},
		{"follow of a stopped box returns", api.LogsOptions{Follow: true, Since: since}, "", "trapped\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if out, errOut := logs(t, s, id, tt.o); out != tt.stdout || errOut != tt.stderr {
				t.Errorf("stdout %q, stderr %q; want %q, %q", out, errOut, tt.stdout, tt.stderr)
			}
		})
	}
}

func TestServiceExecRelaysOutputStdinAndExit(t *testing.T) {
	s := newTestService(t, false)
	id := mustRun(t, s, testRequest(t, "sleep"))
	tests := []struct {
		name        string
		req         api.ExecRequest
		stdin       string
		status      uint32
		out, errOut string
	}{
		{"exit code and streams", api.ExecRequest{Cmd: []string{"exit", "5"}}, "", 5, "bye\n", "oops\n"},
		{"stdin", api.ExecRequest{Cmd: []string{"cat"}, Stdin: true}, "in an exec\n", 0, "in an exec\n", ""},
		{"env", api.ExecRequest{Cmd: []string{"env"}, Env: []string{"EXEC=1"}}, "", 0, "EXEC=1\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut syncBuffer
			stdio := api.Stdio{Stdout: &out, Stderr: &errOut}
			if tt.req.Stdin {
				stdio.Stdin = strings.NewReader(tt.stdin)
			}
			exit, err := s.Exec(testContext(t), id, tt.req, stdio)
			if err != nil {
				t.Fatal(err)
			}
			if exit.Status != tt.status || !strings.Contains(out.String(), tt.out) || errOut.String() != tt.errOut {
				t.Errorf("exit %d, stdout %q, stderr %q; want %d, %q, %q", exit.Status, out.String(), errOut.String(), tt.status, tt.out, tt.errOut)
			}
		})
	}
	// Each exec's log and FIFO go with it; the box runs on, its own log
	// untouched.
	if entries, _ := os.ReadDir(filepath.Join(s.Manager().Store().BoxDir(id), ioDirName)); len(entries) > 0 {
		t.Errorf("exec files left: %s", entries[0].Name())
	}
	if b, err := s.Inspect(testContext(t), id); err != nil || b.Status != string(StatusRunning) {
		t.Errorf("box after execs: %s, %v: want running", b.Status, err)
	}
	if out, errOut := logs(t, s, id, api.LogsOptions{}); out != "" || errOut != "" {
		t.Errorf("the execs' output reached the box's log: %q, %q", out, errOut)
	}
	if _, err := s.Exec(testContext(t), id, api.ExecRequest{}, api.Stdio{}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("exec without a command: %v, want invalid argument", err)
	}
}

func TestServiceStopEndsARunningBoxStopped(t *testing.T) {
	inBothModes(t, func(t *testing.T, s *Service) {
		tests := []struct {
			name   string
			args   []string
			req    api.StopRequest
			status uint32
		}{
			{"exits on SIGTERM", []string{"trap"}, api.StopRequest{}, 143},
			{"exits on the signal given", []string{"trap"}, api.StopRequest{Signal: "INT"}, 130},
			{"ignores SIGTERM: SIGKILL after the timeout", []string{"stubborn"}, api.StopRequest{Timeout: "100ms"}, 137},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				id := mustRun(t, s, testRequest(t, tt.args...))
				if err := s.Stop(testContext(t), id, tt.req); err != nil {
					t.Fatalf("stop: %v", err)
				}
				b, err := s.Inspect(testContext(t), id)
				if err != nil {
					t.Fatal(err)
				}
				if b.Status != string(StatusStopped) || b.ExitStatus != tt.status || b.ShimPid != 0 || b.ShimAddress != "" {
					t.Errorf("after stop: %s %d, shim %d %q; want stopped %d without a shim", b.Status, b.ExitStatus, b.ShimPid, b.ShimAddress, tt.status)
				}
				// The shim was shut down, not lost: once the service's
				// background work is done, nothing has run its delete
				// action (the cleanup after a dead shim), as a daemon's
				// watch on the shim did, racing this stop and the remove
				// that follows, before Stop unwatched the shim first.
				waitIdle(t, s)
				if _, err := os.Stat(filepath.Join(s.Manager().Store().BundleDir(id), "delete-action-ran")); err == nil {
					t.Error("the shim's delete action ran after a clean stop")
				}
				// The log outlives the shim.
				if out, _ := logs(t, s, id, api.LogsOptions{}); tt.args[0] == "trap" && out != "ready\n" {
					t.Errorf("log after stop: %q", out)
				}
				if err := s.Remove(testContext(t), id, false); err != nil {
					t.Fatalf("remove a stopped box: %v", err)
				}
			})
		}
		id := mustRun(t, s, testRequest(t, "sleep"))
		for _, req := range []api.StopRequest{{Timeout: "soon"}, {Timeout: "-1s"}, {Signal: "NOPE"}} {
			if err := s.Stop(testContext(t), id, req); !errdefs.IsInvalidArgument(err) {
				t.Errorf("stop %+v: %v, want invalid argument", req, err)
			}
		}
		if b, err := s.Inspect(testContext(t), id); err != nil || b.Status != string(StatusRunning) {
			t.Errorf("after refused stops: %s, %v: want running", b.Status, err)
		}
	})
}

func TestServiceForceRemoveOfARunningBoxRemovesItsDirectory(t *testing.T) {
	inBothModes(t, func(t *testing.T, s *Service) {
		req := testRequest(t, "sleep")
		req.Name, req.OpenStdin = "web", true
		id := mustRun(t, s, req)
		err := s.Remove(testContext(t), "web", false)
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("remove without force: %v, want failed precondition", err)
		}
		rec, err := s.Inspect(testContext(t), id)
		if err != nil || rec.Status != string(StatusRunning) || rec.ShimPid <= 0 {
			t.Fatalf("after a refused remove: %+v, %v: want running", rec, err)
		}
		if err := s.Remove(testContext(t), "web", true); err != nil {
			t.Fatalf("remove --force: %v", err)
		}
		assertGone(t, s, id, rec)
	})
}
func TestServiceCreateOfABadRequestLeavesNothing(t *testing.T) {
	tests := []struct {
		name    string
		edit    func(*api.CreateRequest)
		env     string
		isClass func(error) bool
		want    string
	}{
		{"no command", func(r *api.CreateRequest) { r.Cmd = nil }, "", errdefs.IsInvalidArgument, "no command given"},
		{"relative rootfs", func(r *api.CreateRequest) { r.Rootfs = "rootfs" }, "", errdefs.IsInvalidArgument, "must be absolute"},
		{"missing rootfs", func(r *api.CreateRequest) { r.Rootfs = "/nonexistent/rootfs" }, "", errdefs.IsInvalidArgument, "does not exist"},
		{"bad health check", func(r *api.CreateRequest) { r.HealthCheck = &api.HealthCheck{Interval: "x"} }, "", errdefs.IsInvalidArgument, "health_check.interval"},
		{"the shim refuses it, with stdin", func(r *api.CreateRequest) { r.OpenStdin = true }, fakeCreateFail, errdefs.IsFailedPrecondition, "guest refused the box"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestService(t, false)
			if tt.env != "" {
				t.Setenv(tt.env, "1")
			}
			req := testRequest(t, "sleep")
			tt.edit(&req)
			fds, goroutines := countFDs(t), runtime.NumGoroutine()
			id, err := s.Create(testContext(t), req)
			if err == nil {
				s.Remove(context.Background(), id, true)
				t.Fatal("created")
			}
			if !tt.isClass(err) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("create: %v, want %q", err, tt.want)
			}
			st := s.Manager().Store()
			for _, dir := range []string{filepath.Join(st.Root(), boxesDir), st.SocketDir()} {
				if entries, _ := os.ReadDir(dir); len(entries) > 0 {
					t.Errorf("left in %s: %s", dir, entries[0].Name())
				}
			}
			s.mu.Lock()
			held := len(s.stdins)
			s.mu.Unlock()
			if held > 0 {
				t.Errorf("the service holds %d stdin(s)", held)
			}
			// Nothing is left open while the service runs on (a daemon's
			// life), not only once it closed.
			if err := poll.Wait(func() error {
				if n, g := countFDs(t), runtime.NumGoroutine(); n > fds || g > goroutines {
					return fmt.Errorf("%d descriptors and %d goroutines, %d and %d before", n, g, fds, goroutines)
				}
				return nil
			}); err != nil {
				t.Errorf("leak after a failed create: %v", err)
			}
		})
	}
}

// countFDs counts this process's open descriptors.
func countFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
