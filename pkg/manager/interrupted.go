package manager

import (
	"context"
	"os"
	"runtime"
	"sync"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// A box's Create is interrupted when the process running it (the CLI or the
// daemon) dies before it returned: the record, bundle and shim may each be
// half made. The record names its creator until Create returns; whoever
// reads a record whose creator is dead recovers the box (recoverCreate).

// FaultDieAtEnv names a point of Manager.Create at which the manager
// SIGKILLs itself, and FaultStopAtEnv one at which it stops itself
// (SIGSTOP, until the test continues it): fault injection for the tests of
// a manager or daemon killed mid-create (fault matrix row 9) and of another
// command acting meanwhile. Test-only: unset (always, outside those tests)
// they do nothing. The points, in order: after-shim-start (the shim runs,
// nothing about it is recorded), after-shim-address (its address is
// recorded, not its pid), after-bootstrap (address and pid recorded, the
// task not asked for), after-task-create (the task exists in the shim, the
// record does not say so) and after-create (Create is about to return: in
// `run`, between Create and Start).
const (
	FaultDieAtEnv  = "BOXLITE_FAULT_DIE_AT"
	FaultStopAtEnv = "BOXLITE_FAULT_STOP_AT"
)

// faultPoint is a point of FaultDieAtEnv and FaultStopAtEnv: the process
// dies or stops here when one of them names it. The signal goes to the
// calling thread, which acts on it before it returns to this code (sent to
// the process, another thread could take it while this one goes on, into
// the store's lock).
func faultPoint(name string) {
	sig := unix.Signal(0)
	switch name {
	case os.Getenv(FaultStopAtEnv):
		sig = unix.SIGSTOP
	case os.Getenv(FaultDieAtEnv):
		sig = unix.SIGKILL
	default:
		return
	}
	log.L.Warnf("fault injection for tests at %s: %v", name, sig)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	unix.Tgkill(os.Getpid(), unix.Gettid(), sig)
	if sig == unix.SIGKILL {
		for {
			time.Sleep(time.Hour) // not reached
		}
	}
}

// self is this process's identity, recorded as the creator of the boxes it
// creates.
var self = sync.OnceValue(func() reaper.Identity {
	id, err := reaper.ReadIdentity(os.Getpid())
	if err != nil {
		// No start time: the record then names no creator, as before
		// creators were recorded.
		return reaper.Identity{}
	}
	return id
})

// CreatorIdentity is the process creating the box (zero once its Create
// returned).
func (r Record) CreatorIdentity() reaper.Identity {
	return reaper.Identity{Pid: r.CreatorPid, StartTime: r.CreatorStartTime}
}

// clearCreator says the box's Create is over.
func (r *Record) clearCreator() {
	r.CreatorPid, r.CreatorStartTime = 0, 0
}

// reconcileCreating reconciles a box whose Create has not returned. While
// its creator lives the box is its creator's: the record is left as it is
// (created) and only the shim, once its address is recorded, is connected,
// so that rm --force can shut a booting box down. (Reading the task's state
// now would find none yet and take the box for a dead one.) A dead creator
// means the create was interrupted: the box is recovered.
func (b *Box) reconcileCreating(ctx context.Context) error {
	alive, err := b.rec.CreatorIdentity().Running()
	if err != nil {
		return err
	}
	if !alive {
		return b.recoverCreate(ctx)
	}
	if b.rec.ShimAddress != "" {
		if conn, err := dialShim(ctx, b.rec.ShimAddress); err == nil {
			b.setConn(conn)
		}
	}
	return nil
}

// recoverCreate finishes a box whose creator died before its Create
// returned. The shim decides: a task it created is a created box, which
// can be started or removed, and the record now says so. Anything less is
// half made and is undone: a shim that is known is shut down and reaped (it
// gives up a boot in progress first), and the shim's delete action ends one
// whose pid was never recorded (it finds it by the box's address), kills a
// VMM left by its pid file and removes the VM's state; stale sockets and
// files go, and the box is stopped with exit 137, to be removed.
func (b *Box) recoverCreate(ctx context.Context) error {
	r := b.rec
	log.G(ctx).WithField("id", r.ID).WithField("creator", r.CreatorPid).Warn("recovering a box whose creator died mid-create")
	if r.ShimPid > 0 {
		if alive, _ := r.ShimIdentity().Running(); alive {
			if conn, err := dialShim(ctx, r.ShimAddress); err == nil {
				b.setConn(conn)
				sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := conn.task.State(sctx, &taskapi.StateRequest{ID: r.ID})
				cancel()
				if err == nil {
					if err := b.update(func(r *Record) { r.clearCreator() }); err != nil {
						return err
					}
					return b.syncState(ctx)
				}
			}
		}
		if err := b.end(ctx, true); err != nil {
			return err
		}
	}
	if err := b.cleanupAfterShim(ctx); err != nil {
		return err
	}
	removeDeadSockets(b.m.store.SocketDir())
	return b.update(func(r *Record) {
		r.markStopped(deadShimExitCode, time.Now().UTC())
		r.clearShim()
		r.clearCreator()
	})
}
