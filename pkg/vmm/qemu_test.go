package vmm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/containerd/errdefs"
)

// fakeVM returns an unstarted VM whose QEMU is this test binary in mode
// (see fakeQEMU), with leak checks registered first.
func fakeVM(t *testing.T, mode string, edit func(*Config)) *QEMU {
	t.Helper()
	checkLeaks(t)
	t.Setenv(fakeQEMUEnv, mode)
	// The race runtime otherwise sleeps a second before the fake exits.
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	c := validFiles(t)
	if edit != nil {
		edit(&c)
	}
	q, err := NewQEMU(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := q.Kill(); err != nil {
			t.Error(err)
		}
	})
	return q
}

func statePath(q *QEMU, name string) string { return filepath.Join(q.cfg.StateDir, name) }

// assertGone fails if any of the VM's runtime files is still there.
func assertGone(t *testing.T, q *QEMU) {
	t.Helper()
	for _, name := range []string{PidFileName, QMPSocketName, AgentSocketName} {
		if _, err := os.Stat(statePath(q, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after exit: %v", name, err)
		}
	}
}

func TestStartStopLifecycle(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	ctx := testCtx(t, 10*time.Second)
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	id := q.Identity()
	if got, err := reaper.ReadPidFile(statePath(q, PidFileName)); err != nil || got != id || id.StartTime == 0 {
		t.Fatalf("pid file = %v, %v; want %v", got, err, id)
	}
	if st, err := os.Stat(q.AgentSocket()); err != nil || st.Mode().Type() != os.ModeSocket {
		t.Errorf("agent socket: %v", err)
	}
	waitTail(t, q, "fake qemu: booting")

	exits := make(chan reaper.Exit, 3)
	for range 3 {
		go func() {
			e, _ := q.Wait(ctx)
			exits <- e
		}()
	}
	if err := q.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if e := <-exits; e.Pid != id.Pid || e.Status != 0 {
			t.Errorf("Wait() = %v, want pid %d status 0", e, id.Pid)
		}
	}
	assertGone(t, q)
	if err := q.Stop(ctx); err != nil {
		t.Errorf("second Stop() = %v", err)
	}
	if err := q.Start(ctx); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "cannot start vm in exited state") {
		t.Errorf("Start() after exit = %v", err)
	}
}

func TestStartContextDoesNotBoundTheVM(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	ctx, cancel := context.WithCancel(context.Background())
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	// Still answering QMP after the start ctx is gone.
	c, err := dialQMP(testCtx(t, 5*time.Second), q.qmpPath)
	if err != nil {
		t.Fatalf("vm died with its start ctx: %v", err)
	}
	c.Close()
	select {
	case <-q.Done():
		t.Fatal("vm done after start ctx was cancelled")
	default:
	}
}

func TestStopKillsAtTheDeadlineWhenQuitIsIgnored(t *testing.T) {
	q := fakeVM(t, "ignore-quit", nil)
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := q.Stop(testCtx(t, 300*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d < 250*time.Millisecond {
		t.Errorf("Stop() returned after %v, before the deadline", d)
	}
	if e, err := q.Wait(testCtx(t, time.Second)); err != nil || e.Status != 137 || e.Signal != syscall.SIGKILL {
		t.Errorf("Wait() = %v, %v; want SIGKILL", e, err)
	}
	assertGone(t, q)
}

func TestStopKillsAtOnceWhenQMPIsGone(t *testing.T) {
	q := fakeVM(t, "greet-once", nil)
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := q.Stop(testCtx(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Errorf("Stop() took %v although QEMU could not be asked to quit", d)
	}
	if e, _ := q.Wait(testCtx(t, time.Second)); e.Status != 137 {
		t.Errorf("exit = %v, want 137", e)
	}
}

func TestKill(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := q.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-q.Done():
	default:
		t.Fatal("Kill() returned before the vm was done")
	}
	if e, _ := q.Wait(testCtx(t, time.Second)); e.Status != 137 {
		t.Errorf("exit = %v, want 137", e)
	}
	assertGone(t, q)
	if err := q.Kill(); err != nil {
		t.Errorf("second Kill() = %v", err)
	}
}

func TestStartFailsWhenQEMUExits(t *testing.T) {
	q := fakeVM(t, "exit", nil)
	err := q.Start(testCtx(t, 10*time.Second))
	if err == nil || !strings.Contains(err.Error(), "qemu exited during start: pid") ||
		!strings.Contains(err.Error(), "fake qemu: -fsdev: invalid option") {
		t.Fatalf("Start() = %v; want the exit and QEMU's complaint", err)
	}
	if e, err := q.Wait(testCtx(t, time.Second)); err != nil || e.Status != 1 {
		t.Errorf("Wait() = %v, %v; want status 1", e, err)
	}
	assertGone(t, q)
	if got, err := os.ReadFile(statePath(q, ConsoleLogName)); err != nil || !strings.Contains(string(got), "invalid option") {
		t.Errorf("console.log = %q, %v", got, err)
	}
}

func TestStartTimesOutAndReapsQEMU(t *testing.T) {
	q := fakeVM(t, "silent", nil)
	err := q.Start(testCtx(t, 300*time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start() = %v, want deadline exceeded", err)
	}
	select {
	case <-q.Done():
	default:
		t.Fatal("Start() failed but left QEMU running")
	}
	assertGone(t, q)
}

func TestKillDuringStart(t *testing.T) {
	q := fakeVM(t, "silent", nil)
	started := make(chan error, 1)
	go func() { started <- q.Start(testCtx(t, 20*time.Second)) }()
	<-q.launched
	if err := q.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := <-started; err == nil || !strings.Contains(err.Error(), "qemu exited during start") {
		t.Errorf("Start() = %v, want it to fail because QEMU was killed", err)
	}
}

func TestStopBeforeStart(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	if err := q.Stop(testCtx(t, time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Wait(testCtx(t, time.Second)); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Wait() = %v, want failed precondition", err)
	}
	if err := q.Start(testCtx(t, time.Second)); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Start() after Stop() = %v", err)
	}
}

func TestStartRefusesAStateDirWithALiveMonitor(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	self, err := reaper.ReadIdentity(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if err := reaper.WritePidFile(statePath(q, PidFileName), self); err != nil {
		t.Fatal(err)
	}
	if err := q.Start(testCtx(t, time.Second)); !errdefs.IsAlreadyExists(err) {
		t.Errorf("Start() = %v, want already exists", err)
	}
}

func TestWaitHonoursItsContext(t *testing.T) {
	q := fakeVM(t, "ok", nil)
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Wait(testCtx(t, 50*time.Millisecond)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait() = %v, want deadline exceeded", err)
	}
}

// waitTail polls the console tail until a line contains want.
func waitTail(t *testing.T, q *QEMU, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, l := range q.ConsoleTail(50) {
			if strings.Contains(l, want) {
				return
			}
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
	t.Fatalf("no %q on the console: %q", want, q.ConsoleTail(20))
}
