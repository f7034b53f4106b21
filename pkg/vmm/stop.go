package vmm

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Stop shuts the VM down and returns once the monitor has been reaped and
// its pid file removed. It asks QEMU to quit over QMP (a guest that should
// shut itself down first is asked by the layer that speaks its protocol,
// pkg/sandbox), then sends SIGKILL at ctx's deadline (DefaultStopTimeout without one) and waits a
// bounded time for the reaper. Stop is idempotent and safe to call
// concurrently with Wait, Kill and itself; only the first concurrent caller
// runs the graceful steps. A VM that was never started is marked exited.
func (q *QEMU) Stop(ctx context.Context) error {
	proc, first := q.beginStop(true)
	if proc == nil {
		return nil
	}
	ctx, cancel := withDefaultDeadline(ctx, DefaultStopTimeout)
	defer cancel()
	if first && !q.graceful(ctx) {
		return q.kill(proc)
	}
	select {
	case <-q.done:
		return nil
	case <-ctx.Done():
	}
	log.G(ctx).WithField("pid", proc.Pid()).Warn("vm did not stop in time: killing it")
	return q.kill(proc)
}

// Kill sends SIGKILL to the monitor and waits up to a few seconds for it to
// be reaped. It returns an error naming the pid if it was not. A VM that was
// never started is marked exited.
func (q *QEMU) Kill() error {
	proc, _ := q.beginStop(false)
	if proc == nil {
		return nil
	}
	return q.kill(proc)
}

// beginStop returns the monitor process to stop (nil if none was or will
// be launched) and, for a graceful stop, whether this caller is the first
// one. A VM still in the created state moves to exited.
func (q *QEMU) beginStop(graceful bool) (*reaper.Process, bool) {
	q.mu.Lock()
	if q.state == stateCreated {
		q.state = stateExited
		q.err = errNotStarted
		q.mu.Unlock()
		close(q.launched)
		close(q.done)
		return nil, false
	}
	first := graceful && !q.stopping
	if graceful {
		q.stopping = true
	}
	q.mu.Unlock()
	// A launch in progress is short and bounded: wait for its outcome.
	<-q.launched
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.proc, first
}

// graceful runs the polite steps of Stop. It returns false when QEMU could
// not even be asked to quit, so waiting longer is pointless.
func (q *QEMU) graceful(ctx context.Context) bool {
	select {
	case <-q.done:
		return true
	default:
	}
	qctx, cancel := context.WithDeadline(ctx, share(ctx, 2))
	defer cancel()
	c, err := dialQMP(qctx, q.qmpPath)
	if err == nil {
		err = c.Quit(qctx)
		c.Close()
	}
	if err != nil {
		select {
		case <-q.done:
			return true
		default:
		}
		log.G(ctx).WithError(err).WithField("pid", q.Identity().Pid).Warn("qmp quit failed")
		return false
	}
	return true
}

// share returns the time that is 1/n of the way from now to ctx's deadline.
func share(ctx context.Context, n int) time.Time {
	now := time.Now()
	dl, ok := ctx.Deadline()
	if !ok {
		return now.Add(DefaultStopTimeout / time.Duration(n))
	}
	return now.Add(dl.Sub(now) / time.Duration(n))
}

// kill sends SIGKILL to proc and waits up to killReapTimeout for the VM to
// be done.
func (q *QEMU) kill(proc *reaper.Process) error {
	if err := proc.Signal(syscall.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
		log.L.WithError(err).WithField("pid", proc.Pid()).Warn("kill vmm")
	}
	t := time.NewTimer(killReapTimeout)
	defer t.Stop()
	select {
	case <-q.done:
		return nil
	case <-t.C:
	}
	return fmt.Errorf("vmm pid %d not reaped %v after SIGKILL: %w", proc.Pid(), killReapTimeout, context.DeadlineExceeded)
}
