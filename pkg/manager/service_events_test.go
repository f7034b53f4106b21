package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/api"
)

// Tests of what the Service does on its own: events, and a daemon's watch
// on its boxes' shims and auto-removal.

// waitIdle waits for the service's background work (shim watches, auto
// removes) to end: with no box running there must be none.
func waitIdle(t *testing.T, s *Service) {
	t.Helper()
	idle := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(idle)
	}()
	select {
	case <-idle:
	case <-time.After(poll.Timeout):
		t.Fatal("the service's background work did not end with no box running")
	}
}

// A daemon forgets the shims of the boxes it removed: no watch, no
// goroutine is left per removed box.
func TestDaemonForgetsTheShimsOfRemovedBoxes(t *testing.T) {
	s := newTestService(t, true)
	for range 3 {
		id := mustRun(t, s, testRequest(t, "sleep"))
		if err := s.Remove(testContext(t), id, true); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	n := len(s.watching)
	s.mu.Unlock()
	if n > 0 {
		t.Errorf("%d shim watches left", n)
	}
	waitIdle(t, s)
}

// subscribe runs s.Events until the test ends and returns what it gets,
// once the subscription is in place.
func subscribe(t *testing.T, s *Service) <-chan api.Event {
	t.Helper()
	s.bus.mu.Lock()
	before := len(s.bus.subs)
	s.bus.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	evs := make(chan api.Event, eventBuffer)
	done := make(chan error, 1)
	go func() { done <- s.Events(ctx, func(ev api.Event) { evs <- ev }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("events: %v", err)
		}
	})
	poll.Until(t, "the events subscription", func() error {
		s.bus.mu.Lock()
		defer s.bus.mu.Unlock()
		if len(s.bus.subs) == before {
			return errors.New("not subscribed")
		}
		return nil
	})
	return evs
}

// nextExit returns the next exit event of box id.
func nextExit(t *testing.T, evs <-chan api.Event, id string) api.Event {
	t.Helper()
	timeout := time.After(poll.Timeout)
	for {
		select {
		case ev := <-evs:
			if ev.Exited && ev.ID == id && ev.ExecID == "" {
				return ev
			}
		case <-timeout:
			t.Fatalf("no exit event of %s", id)
		}
	}
}

func TestServiceEventsReportAnExitTheStoreRecords(t *testing.T) {
	s := newTestService(t, false)
	evs := subscribe(t, s)
	id := mustRun(t, s, testRequest(t, "sleep"))
	if err := s.Kill(testContext(t), id, api.KillRequest{Signal: "KILL"}); err != nil {
		t.Fatal(err)
	}
	// Nobody waits: only the shim's TaskExit tells the store.
	ev := nextExit(t, evs, id)
	if ev.ExitStatus != 137 || ev.Topic != "/tasks/exit" {
		t.Errorf("event %+v, want /tasks/exit 137", ev)
	}
	rec, err := s.Manager().Store().Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != StatusStopped || rec.ExitStatus != 137 {
		t.Errorf("record %s %d, want stopped 137", rec.Status, rec.ExitStatus)
	}
	// Only one process serves a state directory's events.
	other, err := NewService(ServiceConfig{Config: Config{StateRoot: s.Manager().Store().Root(), ShimBinary: s.m.shim.binary, Self: s.m.shim.self}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.Events(testContext(t), func(api.Event) {}); !errors.Is(err, ErrEventsBusy) {
		t.Errorf("events from a second service: %v, want ErrEventsBusy", err)
	}
	if _, err := NewService(ServiceConfig{Config: Config{StateRoot: s.Manager().Store().Root(), ShimBinary: s.m.shim.binary, Self: s.m.shim.self}, Daemon: true}); !errors.Is(err, ErrEventsBusy) {
		t.Errorf("a second daemon: %v, want ErrEventsBusy", err)
	}
}

func TestDaemonNoticesADeadShimAtOnce(t *testing.T) {
	s := newTestService(t, true)
	evs := subscribe(t, s)
	id := mustRun(t, s, testRequest(t, "sleep"))
	rec, err := s.Inspect(testContext(t), id)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(rec.ShimPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Nobody asks: the daemon's watch reaps the shim, stops the box and
	// says so.
	if ev := nextExit(t, evs, id); ev.ExitStatus != 137 {
		t.Errorf("exit event %+v, want 137", ev)
	}
	got, err := s.Manager().Store().Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != StatusStopped || got.ExitStatus != 137 || got.ShimPid != 0 {
		t.Errorf("record after the shim died: %s %d shim %d, want stopped 137 without a shim", got.Status, got.ExitStatus, got.ShimPid)
	}
	if _, err := os.Stat(filepath.Join(got.Bundle, "delete-action-ran")); err != nil {
		t.Errorf("the shim's delete action did not run: %v", err)
	}
}

func TestDaemonRemovesAnAutoRemoveBoxWhenItExits(t *testing.T) {
	s := newTestService(t, true)
	req := testRequest(t, "sleep")
	req.AutoRemove = true
	id := mustRun(t, s, req)
	rec, err := s.Inspect(testContext(t), id)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Kill(testContext(t), id, api.KillRequest{}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the auto-remove", func() error {
		if _, err := s.m.store.Get(id); !errdefs.IsNotFound(err) {
			return fmt.Errorf("record still there (%v)", err)
		}
		return nil
	})
	assertGone(t, s, id, rec)
}
