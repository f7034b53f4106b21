package sandbox

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// fakeVM is a VMM that exits when told, and whose Stop fails a set number
// of times first (a VMM that could not be reaped).
type fakeVM struct {
	done     chan struct{}
	exitOnce sync.Once
	mu       sync.Mutex
	// stopFailures is how many Stops fail before one succeeds.
	stopFailures int
	// calls records Stop and Kill calls in order.
	calls []string
}

func newFakeVM() *fakeVM { return &fakeVM{done: make(chan struct{})} }

func (f *fakeVM) exit()                                     { f.exitOnce.Do(func() { close(f.done) }) }
func (f *fakeVM) Start(context.Context) error               { return nil }
func (f *fakeVM) Done() <-chan struct{}                     { return f.done }
func (f *fakeVM) Wait(context.Context) (reaper.Exit, error) { <-f.done; return reaper.Exit{}, nil }
func (f *fakeVM) Identity() reaper.Identity                 { return reaper.Identity{Pid: 4242} }
func (f *fakeVM) OOMKilled() bool                           { return false }
func (f *fakeVM) AgentSocket() string                       { return "" }
func (f *fakeVM) ConsoleTail(int) []string                  { return nil }

func (f *fakeVM) record(call string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call)
}

func (f *fakeVM) Stop(context.Context) error {
	f.record("stop")
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopFailures > 0 {
		f.stopFailures--
		return errors.New("vmm pid 4242 not reaped")
	}
	f.exitOnce.Do(func() { close(f.done) })
	return nil
}

func (f *fakeVM) Kill() error {
	f.record("kill")
	f.exit()
	return nil
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A Stop that failed (the VMM was not reaped) must not be remembered: the
// next Stop tries again. Verified two-sided: with the old sync.Once the
// second Stop returned the first error without calling the VMM.
func TestStopCanBeRetriedAfterAFailure(t *testing.T) {
	f := newFakeVM()
	f.stopFailures = 1
	s := &Sandbox{vm: f, shutdownGuest: func(context.Context) error { return errors.New("no agent") }}
	if err := s.Stop(testCtx(t)); err == nil {
		t.Fatal("first Stop succeeded although the VMM was not reaped")
	}
	if err := s.Stop(testCtx(t)); err != nil {
		t.Fatalf("second Stop = %v; want a retry that succeeds", err)
	}
	if err := s.Stop(testCtx(t)); err != nil {
		t.Fatalf("Stop after success = %v", err)
	}
	if got := len(f.calls); got != 2 {
		t.Errorf("VMM stopped %d times (%v); want 2: a stopped sandbox is not stopped again", got, f.calls)
	}
}

// Stop asks the guest first, and a guest that shuts down in time spares
// the VMM a QMP quit; the sandbox, not the VMM, speaks the guest's
// protocol.
func TestStopAsksTheGuestFirst(t *testing.T) {
	f := newFakeVM()
	asked := false
	s := &Sandbox{vm: f, shutdownGuest: func(context.Context) error {
		asked = true
		f.exit() // the guest rebooted: QEMU -no-reboot exits
		return nil
	}}
	if err := s.Stop(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if !asked {
		t.Fatal("the guest was not asked to shut down")
	}
	select {
	case <-s.Done():
	default:
		t.Fatal("Stop returned before the VM was done")
	}
}

// A guest that agrees to shut down but never does costs at most half of
// the stop's time before the VMM is stopped.
func TestStopBoundsAGuestThatDoesNotShutDown(t *testing.T) {
	f := newFakeVM()
	s := &Sandbox{vm: f, shutdownGuest: func(context.Context) error { return nil }}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := s.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 1900*time.Millisecond {
		t.Errorf("Stop took %v of its 2s: the guest's wait is not bounded by half", d)
	}
	if len(f.calls) != 1 || f.calls[0] != "stop" {
		t.Errorf("VMM calls %v; want one stop", f.calls)
	}
}

func TestPidAndIdentitySpeakForTheVMM(t *testing.T) {
	s := &Sandbox{vm: newFakeVM()}
	if s.Pid() != 4242 || s.Identity().Pid != 4242 {
		t.Fatalf("Pid() = %d, Identity().Pid = %d; want the VMM's 4242", s.Pid(), s.Identity().Pid)
	}
}
