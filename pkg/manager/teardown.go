package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// shimGone handles a box whose shim died (or whose pid was reused): the
// shim's delete action kills the VMM if it is still there and cleans up,
// stale files are removed, and the box is stopped with exit 137 unless it
// had already exited.
func (b *Box) shimGone(ctx context.Context) error {
	if err := b.cleanupAfterShim(ctx); err != nil {
		return err
	}
	return b.update(func(r *Record) {
		r.markStopped(deadShimExitCode, time.Now().UTC())
		r.clearShim()
	})
}

// cleanupAfterShim runs once the shim process is gone: the delete action
// (the canonical kill path for a VM without its shim), then removal of the
// stale socket, pid files and FIFOs. Files are removed only once the VMM is
// verified dead; otherwise the error names its pid.
func (b *Box) cleanupAfterShim(ctx context.Context) error {
	r := b.rec
	if _, err := os.Stat(filepath.Join(r.Bundle, "config.json")); err == nil && b.m.shimErr == nil {
		dctx, cancel := context.WithTimeout(ctx, shimDeleteTimeout)
		_, err := b.m.shim.delete(dctx, r.ID, r.Bundle)
		cancel()
		if err != nil {
			log.G(ctx).WithError(err).WithField("id", r.ID).Warn("shim delete action failed")
		}
	}
	if vmm := r.VMMIdentity(); vmm.Pid > 0 {
		if alive, _ := vmm.Running(); alive {
			return fmt.Errorf("box %s: its shim is gone but VMM pid %d is still running: kill -9 %d, then retry",
				b.name(), vmm.Pid, vmm.Pid)
		}
	}
	b.removeStaleFiles()
	return nil
}

// removeStaleFiles removes what a dead shim leaves: its socket, pid and
// socket files in the bundle, and the box's FIFOs. (The VM's own state is
// the shim's delete action's to remove.)
func (b *Box) removeStaleFiles() {
	r := b.rec
	if p := strings.TrimPrefix(r.ShimAddress, "unix://"); strings.HasPrefix(p, b.m.store.SocketDir()+"/") {
		os.Remove(p)
	}
	for _, name := range []string{"shim.pid", "address"} {
		os.Remove(filepath.Join(r.Bundle, name))
	}
	matches, _ := filepath.Glob(filepath.Join(r.Bundle, "*.sock"))
	for _, m := range matches {
		os.Remove(m)
	}
	os.RemoveAll(filepath.Join(b.Dir(), ioDirName))
}

// Stop tears down a box whose process has exited, keeping its record: the
// task is deleted (the VM goes), the shim shut down and reaped.
func (b *Box) Stop(ctx context.Context) error {
	return b.teardown(ctx, false)
}

// Remove removes the box: a running box only with force (its process is
// killed first). The shim is shut down and reaped, then the record, bundle
// and FIFOs are removed. The record is not updated on the way (so a box
// can be removed from a full state directory, which frees room).
func (b *Box) Remove(ctx context.Context, force bool) error {
	if b.rec.Running() && !force {
		return errorf(errdefs.ErrFailedPrecondition, "box %s is running: stop it or use rm --force", b.name())
	}
	if err := b.end(ctx, force); err != nil {
		return err
	}
	if err := b.m.unmountImage(b.rec); err != nil {
		return err
	}
	return b.m.store.Remove(b.rec.ID)
}

// undo removes a box whose creation failed: shim shut down (or killed) and
// reaped, the VM cleaned up, record and bundle removed.
func (b *Box) undo() error {
	ctx, cancel := context.WithTimeout(context.Background(), undoTimeout)
	defer cancel()
	if b.ours && b.rec.ShimPid == 0 {
		// The start action ran but the shim's pid was never learned (its
		// answer was unusable, or it did not answer Connect).
		if err := b.killStrayShims(ctx); err != nil {
			return err
		}
	}
	// The record goes: it is not updated first (on a full state
	// directory that write is what failed).
	if err := b.end(ctx, true); err != nil {
		return err
	}
	if err := b.m.unmountImage(b.rec); err != nil {
		return err
	}
	return b.m.store.Remove(b.rec.ID)
}

// teardown ends the box's shim (see end) and leaves the record stopped.
func (b *Box) teardown(ctx context.Context, kill bool) error {
	if err := b.end(ctx, kill); err != nil {
		return err
	}
	err := b.update(func(r *Record) {
		r.markStopped(deadShimExitCode, time.Now().UTC())
		r.clearShim()
	})
	if errdefs.IsNotFound(err) {
		return nil // another manager removed the box meanwhile
	}
	return err
}

// end is the one route from a live or dead shim to none: kill the process
// (when killing), delete the task, shut the shim down, reap it (SIGKILL if
// it does not exit), then run the delete action if the shim had to be
// killed, and remove stale files.
func (b *Box) end(ctx context.Context, kill bool) error {
	if b.conn != nil {
		if kill && b.rec.Status != StatusStopped {
			b.killAndWait(ctx)
		}
		dctx, cancel := context.WithTimeout(ctx, deleteTimeout)
		resp, err := b.conn.task.Delete(dctx, &taskapi.DeleteRequest{ID: b.rec.ID})
		cancel()
		if err == nil {
			b.update(func(r *Record) { r.markStopped(resp.GetExitStatus(), resp.GetExitedAt().AsTime()) })
		} else {
			// Not found or not deletable (another manager deleted it, or a
			// process that would not die): Shutdown with Now ends the VM.
			log.G(ctx).WithError(errgrpc.ToNative(err)).WithField("id", b.rec.ID).Debug("delete task")
		}
		sctx, cancel := context.WithTimeout(ctx, shutdownTimeout)
		_, err = b.conn.task.Shutdown(sctx, &taskapi.ShutdownRequest{ID: b.rec.ID, Now: true})
		cancel()
		if err != nil && !errors.Is(err, ttrpc.ErrClosed) {
			log.G(ctx).WithError(err).WithField("id", b.rec.ID).Debug("shutdown shim")
		}
		b.Close()
	}
	killed, err := b.reapShim(ctx)
	if err != nil {
		return err
	}
	if killed || b.rec.ShimAddress != "" && b.rec.ShimPid == 0 {
		if err := b.cleanupAfterShim(ctx); err != nil {
			return err
		}
	} else {
		b.removeStaleFiles()
	}
	return nil
}

// killStrayShims kills and reaps the shims of this box whose pid the
// manager never learned: children of this process (a daemonized shim
// reparents to its subreaper) serving the box (see isShimOf). Then the
// shim's delete action cleans up what they left, and sockets nobody listens
// on are removed.
func (b *Box) killStrayShims(ctx context.Context) error {
	b.ours = false
	b.update(func(r *Record) { r.ShimAddress = "" })
	for _, pid := range reaper.Children(os.Getpid()) {
		if !b.isShimOf(pid) {
			continue
		}
		id, err := reaper.ReadIdentity(pid)
		if err != nil {
			continue
		}
		log.G(ctx).WithField("id", b.rec.ID).WithField("pid", pid).Warn("killing a shim that never answered")
		if err := id.Signal(unix.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if out, _, err := reaper.Default().Reap(pid, time.Now().Add(shimKillTimeout)); err != nil || out == reaper.TimedOut {
			return fmt.Errorf("box %s: shim pid %d did not exit after SIGKILL", b.name(), pid)
		}
		if err := b.cleanupAfterShim(ctx); err != nil {
			return err
		}
	}
	removeDeadSockets(b.m.store.SocketDir())
	return nil
}

// isShimOf says process pid is the long-lived shim of this box: its
// command line is the one the start action gives it, naming the box's id
// and this manager's address. (Its working directory, the bundle, cannot
// tell: once the box was removed it reads "<state>/boxes/.rm-<id>/bundle
// (deleted)".)
func (b *Box) isShimOf(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimSuffix(string(data), "\x00"), "\x00")
	if len(args) == 0 || args[len(args)-1] == "start" || args[len(args)-1] == "delete" {
		return false // an action, not the shim it spawns
	}
	want := []string{"-id", b.rec.ID, "-address", b.m.shim.grpcAddress}
	for i := range args {
		if slices.Equal(args[i:min(i+len(want), len(args))], want) {
			return true
		}
	}
	return false
}

// killAndWait SIGKILLs every process of the box and waits (bounded) for the
// box's process to exit.
func (b *Box) killAndWait(ctx context.Context) {
	kctx, cancel := context.WithTimeout(ctx, killWaitTimeout)
	defer cancel()
	if err := b.Kill(kctx, "", syscall.SIGKILL, true); err != nil {
		// Not created, or exited meanwhile: Delete and Shutdown follow.
		log.G(ctx).WithError(err).WithField("id", b.rec.ID).Debug("kill box")
		return
	}
	resp, err := b.conn.task.Wait(kctx, &taskapi.WaitRequest{ID: b.rec.ID})
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", b.rec.ID).Warn("wait for killed box")
		return
	}
	b.update(func(r *Record) { r.markStopped(resp.GetExitStatus(), resp.GetExitedAt().AsTime()) })
}

// reapShim waits (bounded) for the shim to exit after Shutdown, SIGKILLs it
// if it does not, and waits for that. It reports whether the shim had to be
// killed. A shim that is not our child is watched through a pidfd; one that
// is (started by this process) is collected by the reaper's loop.
func (b *Box) reapShim(ctx context.Context) (killed bool, err error) {
	id := b.rec.ShimIdentity()
	if id.Pid <= 0 {
		return false, nil
	}
	if ok, err := id.Exists(); err != nil || !ok {
		return false, err
	}
	out, _, err := reaper.Default().Reap(id.Pid, time.Now().Add(shimExitTimeout))
	if err != nil {
		return false, err
	}
	if out != reaper.TimedOut {
		return false, nil
	}
	log.G(ctx).WithField("id", b.rec.ID).WithField("pid", id.Pid).Warn("shim did not exit: killing it")
	if err := id.Signal(unix.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
		return true, err
	}
	out, _, err = reaper.Default().Reap(id.Pid, time.Now().Add(shimKillTimeout))
	if err != nil {
		return true, err
	}
	if out == reaper.TimedOut {
		return true, fmt.Errorf("box %s: shim pid %d did not exit after SIGKILL", b.name(), id.Pid)
	}
	return true, nil
}
