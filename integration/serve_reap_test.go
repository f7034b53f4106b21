package integration

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
)

// reapBound is how soon after the daemon's Remove returned its shim must be
// gone from /proc (LESSONS 1): Remove itself reaps it, so it is gone
// already; the bound only absorbs scheduling.
const reapBound = time.Second

// deathBound bounds the cleanup after a shim died on its own: the daemon
// reaps it at once, then runs the shim's delete action for the VM.
const deathBound = time.Minute

// faultyBox starts a sleeping box through a daemon running with the no-reap
// fault injection; a daemon that cannot even make a box fails the test
// naming the reason.
func faultyBox(t *testing.T, d *daemon, rootfs string) api.Box {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	id, err := d.c.Create(ctx, sleepBox(rootfs))
	if err != nil {
		t.Fatalf("create a box through a daemon with %s: %v\n"+
			"The fault injection must stop only the reaping of the shims that reparent to the daemon: "+
			"the daemon waits for the shim's start action it runs itself, and a reaper that never reaps "+
			"never delivers that exit, so no box can be made and the two-sided check cannot run.", faultNoReap, err)
	}
	if err := d.c.Start(ctx, id); err != nil {
		t.Fatalf("start box %s through a daemon with %s: %v", id, faultNoReap, err)
	}
	b, err := d.c.Inspect(ctx, id)
	if err != nil || b.ShimPid <= 0 {
		t.Fatalf("inspect box %s: %+v, %v", id, b, err)
	}
	return b
}

// assertShimOf fails the test unless the shim's parent is the daemon: the
// shim reparented to it, so the daemon, and only it, can reap it.
func assertShimOf(t *testing.T, shim int, d *daemon) {
	t.Helper()
	if st := procStatus(shim); !strings.Contains(st, "PPid: "+strconv.Itoa(d.Pid())) {
		t.Fatalf("shim pid %d is not the daemon's (pid %d) child: %s", shim, d.Pid(), st)
	}
}

// assertStaysZombie waits (bounded) for pid to be a zombie of ppid, then
// checks it still is one at not-before (the window in which the reaping
// side requires it gone).
func assertStaysZombie(t *testing.T, what string, pid, ppid int, notBefore time.Time) {
	t.Helper()
	if err := within(deathBound, func() error {
		if st := procStatus(pid); !isZombieOf(st, ppid) {
			return fmt.Errorf("%s", st)
		}
		return nil
	}); err != nil {
		t.Fatalf("%s pid %d never became a zombie of pid %d: %v", what, pid, ppid, err)
	}
	time.Sleep(time.Until(notBefore))
	if st := procStatus(pid); !isZombieOf(st, ppid) {
		t.Fatalf("%s pid %d: %s, want State: Z with PPid: %d (nobody may reap it)", what, pid, st, ppid)
	}
	t.Logf("%s pid %d with reaping off: %s", what, pid, procStatus(pid))
}

// TestServeForceRemoveReapsTheShim (LESSONS 1): a force-remove over REST
// leaves no zombie: the shim is gone from /proc as soon as Remove returns.
// Two-sided: a daemon whose reaper never reaps leaves the shim a zombie of
// the daemon, which this check sees. The "reaping disabled" subtests (here
// and in testServeShimDeath) were seen to pass against a fault hook that
// leaves only reparented processes unreaped and is not inherited by the
// shim; with a hook that reaps nothing at all the daemon cannot create a
// box, and they fail saying so.
func TestServeForceRemoveReapsTheShim(t *testing.T) {
	t.Run("reaping", func(t *testing.T) {
		m := newMgr(t)
		d := m.serve(nil)
		b := serveBox(t, d.c, sleepBox(m.rootfs))
		assertShimOf(t, b.ShimPid, d)
		ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
		defer cancel()
		if err := d.c.Remove(ctx, b.ID, true); err != nil {
			t.Fatalf("force-remove: %v", err)
		}
		goneWithin(t, "shim", b.ShimPid, reapBound)
		goneWithin(t, "VMM", b.VMMPid, deathBound)
		if _, err := d.c.Inspect(ctx, b.ID); !errdefs.IsNotFound(err) {
			t.Errorf("inspect after force-remove: %v, want not found", err)
		}
	})
	t.Run("reaping disabled", func(t *testing.T) {
		m := newMgr(t)
		d := m.serve([]string{faultNoReap})
		b := faultyBox(t, d, m.rootfs)
		assertShimOf(t, b.ShimPid, d)
		ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
		defer cancel()
		// The daemon cannot collect the shim: Remove may report it.
		err := d.c.Remove(ctx, b.ID, true)
		t.Logf("force-remove with reaping off: %v", err)
		assertStaysZombie(t, "shim", b.ShimPid, d.Pid(), time.Now().Add(reapBound))
		// The zombies go with the daemon: they reparent to the test
		// process, which reaps them; the leak check then passes.
		d.stop()
		goneWithin(t, "shim", b.ShimPid, deathBound)
		goneWithin(t, "VMM", b.VMMPid, deathBound)
		// The box's record is left: remove it locally.
		m.ok("rm", "--force", b.ID)
	})
}

func TestServeReapsAShimKilledBySIGKILL(t *testing.T) { testServeShimDeath(t, syscall.SIGKILL) }

func TestServeReapsAShimKilledBySIGTERM(t *testing.T) { testServeShimDeath(t, syscall.SIGTERM) }

// testServeShimDeath (LESSONS 2): a shim killed from outside is reaped by
// the daemon at once (no zombie), its VMM goes with it, and the box is
// stopped with 137, as an exit event says. Two-sided: with the daemon
// stopped (SIGSTOP) the dead shim is its zombie until it continues; with
// its reaper off it stays one.
func testServeShimDeath(t *testing.T, sig syscall.Signal) {
	t.Run("reaping", func(t *testing.T) {
		d, el, b := startedUnderDaemon(t)
		if err := syscall.Kill(b.ShimPid, sig); err != nil {
			t.Fatal(err)
		}
		assertReportedDead(t, d, el, b)
	})
	t.Run("reaping paused", func(t *testing.T) {
		d, el, b := startedUnderDaemon(t)
		if err := syscall.Kill(d.Pid(), syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Kill(d.Pid(), syscall.SIGCONT) })
		if err := syscall.Kill(b.ShimPid, sig); err != nil {
			t.Fatal(err)
		}
		// Stopped, the daemon cannot reap: the check sees the zombie...
		assertStaysZombie(t, "shim", b.ShimPid, d.Pid(), time.Now().Add(reapBound))
		if err := syscall.Kill(d.Pid(), syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		// ...and once it runs again the daemon reaps it and reports it.
		assertReportedDead(t, d, el, b)
	})
	t.Run("reaping disabled", func(t *testing.T) {
		m := newMgr(t)
		d := m.serve([]string{faultNoReap})
		b := faultyBox(t, d, m.rootfs)
		assertShimOf(t, b.ShimPid, d)
		if err := syscall.Kill(b.ShimPid, sig); err != nil {
			t.Fatal(err)
		}
		assertStaysZombie(t, "shim", b.ShimPid, d.Pid(), time.Now().Add(reapBound))
		d.stop()
		goneWithin(t, "shim", b.ShimPid, deathBound)
		goneWithin(t, "VMM", b.VMMPid, deathBound)
		// The box's record is left: remove it locally.
		m.ok("rm", "--force", b.ID)
	})
}

// startedUnderDaemon starts a daemon and a sleeping box under it, and
// returns them once the box started and its shim is the daemon's child,
// with the daemon's events from before the start.
func startedUnderDaemon(t *testing.T) (*daemon, *apiEvents, api.Box) {
	t.Helper()
	m := newMgr(t)
	d := m.serve(nil)
	el := subscribe(t, d.c)
	b := serveBox(t, d.c, sleepBox(m.rootfs))
	el.next(t, "/tasks/start", b.ID, boxTimeout, nil)
	assertShimOf(t, b.ShimPid, d)
	return d, el, b
}

// assertReportedDead checks the aftermath of box b's shim dying: the shim
// and the VMM gone from /proc, an exit event with 137, the box stopped with
// 137; then it removes the box.
func assertReportedDead(t *testing.T, d *daemon, el *apiEvents, b api.Box) {
	t.Helper()
	goneWithin(t, "shim", b.ShimPid, deathBound)
	ev := el.next(t, "/tasks/exit", b.ID, deathBound, nil)
	if ev.ExecID != "" || !ev.Exited || ev.ExitStatus != 137 {
		t.Errorf("exit event %v, want the box's exit with 137", ev)
	}
	goneWithin(t, "VMM", b.VMMPid, deathBound)
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	got, err := d.c.Inspect(ctx, b.ID)
	if err != nil || got.Status != "stopped" || got.ExitStatus != 137 || got.ShimPid != 0 || got.VMMPid != 0 {
		t.Errorf("inspect after the shim died: %s exit %d, shim pid %d, VMM pid %d (%v); want stopped 137 without pids",
			got.Status, got.ExitStatus, got.ShimPid, got.VMMPid, err)
	}
	if err := d.c.Remove(ctx, b.ID, false); err != nil {
		t.Errorf("remove the stopped box: %v", err)
	}
}
