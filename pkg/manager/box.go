package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/health"
	"github.com/boxlite/boxlite/pkg/network"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Bounds of the teardown steps. Each step that times out falls through to
// the next, harder one; none is skipped silently.
const (
	killWaitTimeout  = 10 * time.Second
	deleteTimeout    = 30 * time.Second
	shutdownTimeout  = 10 * time.Second
	shimExitTimeout  = 10 * time.Second
	shimKillTimeout  = 10 * time.Second
	undoTimeout      = 90 * time.Second
	deadShimExitCode = 137
)

// processSpecURL is the type URL containerd gives a runtime-spec Process
// marshalled with typeurl (JSON), which is how ExecProcessRequest carries it.
const processSpecURL = "types.containerd.io/opencontainers/runtime-spec/1/Process"

// Box is a handle on one box: its record and, while its shim runs, a
// connection to the shim. Close it when done.
type Box struct {
	m *Manager
	// mu guards rec and conn: Kill and ResizePty may run while Wait does.
	mu sync.Mutex
	// rec is the record as last read or written. Guarded by mu.
	rec *Record
	// conn is the shim connection; nil when the shim is not running.
	// Guarded by mu.
	conn *shimConn
	// ours says this process bootstrapped the shim (so it may be our
	// child; the reaper collects it either way).
	ours bool
}

// Record returns a copy of the box's record as last read or written.
func (b *Box) Record() Record {
	b.mu.Lock()
	defer b.mu.Unlock()
	return *b.rec
}

// ID is the box id.
func (b *Box) ID() string { return b.Record().ID }

// Dir is the box's directory in the state directory.
func (b *Box) Dir() string { return b.m.store.BoxDir(b.ID()) }

// Close drops the shim connection; the box keeps running.
func (b *Box) Close() error {
	b.mu.Lock()
	conn := b.conn
	b.conn = nil
	b.mu.Unlock()
	return conn.Close()
}

// update changes the record in the store and keeps the result. When the
// state directory is full (ENOSPC) the change is kept by this handle only
// and the error returned: the handle still tells the truth about the box
// (a teardown that follows must know it runs), and the record on disk
// catches up at the next update that has room.
func (b *Box) update(fn func(*Record)) error {
	rec, err := b.m.store.Update(b.ID(), func(r *Record) error { fn(r); return nil })
	if errors.Is(err, syscall.ENOSPC) {
		r := b.Record()
		fn(&r)
		rec = &r
	} else if err != nil {
		return err
	}
	b.mu.Lock()
	b.rec = rec
	b.mu.Unlock()
	return err
}

// setConn keeps a new shim connection.
func (b *Box) setConn(c *shimConn) {
	b.mu.Lock()
	b.conn = c
	b.mu.Unlock()
}

// shim returns the shim connection and the box id, or an error when the box
// has no running shim.
func (b *Box) shim() (*shimConn, string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn == nil {
		return nil, "", errorf(errdefs.ErrFailedPrecondition, "box %s is not running (%s)", b.nameLocked(), b.rec.Status)
	}
	return b.conn, b.rec.ID, nil
}

// name is how errors refer to the box.
func (b *Box) name() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nameLocked()
}

func (b *Box) nameLocked() string {
	if b.rec.Name != "" {
		return b.rec.Name
	}
	return b.rec.ID
}

// Running says the box's process is (or may be) alive: running, paused, or
// unknown because the shim does not answer.
func (r *Record) Running() bool {
	return r.Status == StatusRunning || r.Status == StatusPaused || r.Status == StatusUnknown
}

// refresh reconciles the record with the world. A live shim is reconnected
// and asked for the task's state; a dead shim (or a reused pid) means the box
// stopped with exit 137: the shim's delete action cleans up the VM and stale
// files are removed. A dead VMM under a live shim also means exit 137. On a
// full state directory the box is reconciled for this handle only (see
// update), so that it can still be inspected, stopped and removed.
func (b *Box) refresh(ctx context.Context) error {
	err := b.reconcile(ctx)
	if errors.Is(err, syscall.ENOSPC) {
		log.G(ctx).WithError(err).WithField("id", b.ID()).Warn("box record not updated")
		return nil
	}
	return err
}

func (b *Box) reconcile(ctx context.Context) error {
	r := b.rec
	if r.CreatorPid > 0 {
		return b.reconcileCreating(ctx)
	}
	if r.ShimAddress == "" && r.ShimPid == 0 {
		if r.Status != StatusStopped {
			return b.update(func(r *Record) { r.markStopped(deadShimExitCode, time.Now().UTC()) })
		}
		return nil
	}
	alive := false
	if r.ShimPid > 0 {
		var err error
		if alive, err = r.ShimIdentity().Running(); err != nil {
			return err
		}
	}
	if !alive {
		return b.shimGone(ctx)
	}
	conn, err := dialShim(ctx, r.ShimAddress)
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", r.ID).Warn("shim alive but unreachable")
		return b.update(func(r *Record) { r.Status = StatusUnknown })
	}
	b.setConn(conn)
	return b.syncState(ctx)
}

// syncState asks the shim for the task's state and records it.
func (b *Box) syncState(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := b.conn.task.State(sctx, &taskapi.StateRequest{ID: b.rec.ID})
	err = errgrpc.ToNative(err)
	vmm, vmmKnown := b.rec.VMMIdentity(), b.rec.VMMPid > 0
	if !vmmKnown && err == nil && st.GetPid() > 0 {
		// The shim's task pid is its VMM's.
		if id, rerr := reaper.ReadIdentity(int(st.GetPid())); rerr == nil {
			vmm, vmmKnown = id, true
		}
	}
	vmmDead := false
	if vmmKnown {
		running, _ := vmm.Running()
		vmmDead = !running
	}
	// The shim keeps the box's health in the bundle (events may have gone
	// unheard while no manager served them).
	hs, herr := health.ReadFile(b.rec.Bundle)
	ni, nerr := network.ReadInfo(b.rec.Bundle)
	return b.update(func(r *Record) {
		if nerr == nil {
			r.Interfaces = ni.Interfaces
		}
		if vmmKnown && !vmmDead {
			r.VMMPid, r.VMMStartTime = vmm.Pid, vmm.StartTime
		}
		if vmmDead {
			// Not a pid to show or signal any more.
			r.VMMPid, r.VMMStartTime = 0, 0
		}
		if herr == nil {
			r.Health = string(hs.Status)
		}
		switch {
		case errdefs.IsNotFound(err):
			// The task was deleted in the shim; its exit is what we have.
			r.markStopped(deadShimExitCode, time.Now().UTC())
		case err != nil:
			r.Status = StatusUnknown
		default:
			r.TaskPid = st.GetPid()
			switch st.GetStatus() {
			case tasktypes.Status_CREATED:
				r.Status = StatusCreated
			case tasktypes.Status_RUNNING, tasktypes.Status_PAUSING:
				r.Status = StatusRunning
			case tasktypes.Status_PAUSED:
				r.Status = StatusPaused
			case tasktypes.Status_STOPPED:
				r.Status, r.ExitStatus = StatusStopped, st.GetExitStatus()
				if t := st.GetExitedAt(); t != nil {
					r.ExitedAt = t.AsTime()
				}
			default:
				r.Status = StatusUnknown
			}
		}
		if vmmDead && r.Status != StatusStopped {
			r.markStopped(deadShimExitCode, time.Now().UTC())
		}
	})
}

// Start starts the box's process (execID "") or an exec'd process, and
// returns its pid.
func (b *Box) Start(ctx context.Context, execID string) (uint32, error) {
	conn, id, err := b.shim()
	if err != nil {
		return 0, err
	}
	resp, err := conn.task.Start(ctx, &taskapi.StartRequest{ID: id, ExecID: execID})
	if err != nil {
		return 0, fmt.Errorf("start: %w", errgrpc.ToNative(err))
	}
	if execID == "" {
		err = b.update(func(r *Record) {
			if r.Status == StatusCreated {
				r.Status = StatusRunning
			}
			r.TaskPid = resp.GetPid()
		})
		if errdefs.IsNotFound(err) {
			// It started, exited and was auto-removed meanwhile.
			err = nil
		}
	}
	return resp.GetPid(), err
}

// Exit is how a box's process or an exec'd process ended.
type Exit struct {
	// Status is the exit code (128+n for a signal n).
	Status uint32
	// At is when it exited.
	At time.Time
}

// Wait blocks until the process exits and returns its exit. The box's own
// exit is recorded. A shim that dies meanwhile means exit 137, recorded and
// cleaned up like any dead shim.
func (b *Box) Wait(ctx context.Context, execID string) (Exit, error) {
	conn, id, err := b.shim()
	if err != nil {
		return Exit{}, err
	}
	resp, err := conn.task.Wait(ctx, &taskapi.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		if ctx.Err() == nil && b.shimDied() {
			b.Close()
			if gerr := b.shimGone(context.WithoutCancel(ctx)); gerr != nil {
				return Exit{}, gerr
			}
			return Exit{Status: deadShimExitCode, At: time.Now()}, nil
		}
		return Exit{}, fmt.Errorf("wait: %w", errgrpc.ToNative(err))
	}
	e := Exit{Status: resp.GetExitStatus(), At: resp.GetExitedAt().AsTime()}
	if execID == "" {
		if err := b.update(func(r *Record) { r.markStopped(e.Status, e.At) }); err != nil {
			return e, err
		}
	}
	return e, nil
}

// shimDied says the shim connection broke because the shim is gone: its
// pidfd reports the exit within a second (the socket closes as it exits).
func (b *Box) shimDied() bool {
	id := b.rec.ShimIdentity()
	if ok, err := id.Exists(); err == nil && !ok {
		return true
	}
	out, _, err := reaper.Default().Reap(id.Pid, time.Now().Add(time.Second))
	return err == nil && out != reaper.TimedOut
}

// Kill sends sig to the box's process (execID "") or an exec'd process;
// all signals every process in the box.
func (b *Box) Kill(ctx context.Context, execID string, sig syscall.Signal, all bool) error {
	conn, id, err := b.shim()
	if err != nil {
		return err
	}
	_, err = conn.task.Kill(ctx, &taskapi.KillRequest{ID: id, ExecID: execID, Signal: uint32(sig), All: all})
	if err != nil {
		return fmt.Errorf("kill: %w", errgrpc.ToNative(err))
	}
	return nil
}

// ResizePty sets the terminal size of a process with a terminal.
func (b *Box) ResizePty(ctx context.Context, execID string, width, height uint32) error {
	conn, id, err := b.shim()
	if err != nil {
		return err
	}
	_, err = conn.task.ResizePty(ctx, &taskapi.ResizePtyRequest{ID: id, ExecID: execID, Width: width, Height: height})
	if err != nil {
		return fmt.Errorf("resize terminal: %w", errgrpc.ToNative(err))
	}
	return nil
}

// CloseStdin closes a process's stdin in the shim.
func (b *Box) CloseStdin(ctx context.Context, execID string) error {
	conn, id, err := b.shim()
	if err != nil {
		return err
	}
	_, err = conn.task.CloseIO(ctx, &taskapi.CloseIORequest{ID: id, ExecID: execID, Stdin: true})
	return errgrpc.ToNative(err)
}

// Exec adds an exec'd process to the running box (not started yet). Its
// spec is derived from the box's process.
func (b *Box) Exec(ctx context.Context, execID string, e ExecSpec, stdio Stdio) error {
	conn, id, err := b.shim()
	if err != nil {
		return err
	}
	if b.Record().Status != StatusRunning {
		return errorf(errdefs.ErrFailedPrecondition, "box %s is not running (%s)", b.name(), b.rec.Status)
	}
	spec, err := readSpec(b.rec.Bundle)
	if err != nil {
		return err
	}
	proc, err := execProcess(spec, e)
	if err != nil {
		return err
	}
	data, err := json.Marshal(proc)
	if err != nil {
		return err
	}
	_, err = conn.task.Exec(ctx, &taskapi.ExecProcessRequest{
		ID: id, ExecID: execID, Terminal: e.Terminal,
		Stdin: stdio.Stdin, Stdout: stdio.Stdout, Stderr: stdio.Stderr,
		Spec: &anypb.Any{TypeUrl: processSpecURL, Value: data},
	})
	if err != nil {
		return fmt.Errorf("exec: %w", errgrpc.ToNative(err))
	}
	return nil
}

// DeleteExec removes an exited exec'd process from the shim.
func (b *Box) DeleteExec(ctx context.Context, execID string) error {
	conn, id, err := b.shim()
	if err != nil {
		return err
	}
	_, err = conn.task.Delete(ctx, &taskapi.DeleteRequest{ID: id, ExecID: execID})
	return errgrpc.ToNative(err)
}
