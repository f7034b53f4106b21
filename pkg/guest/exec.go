package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Exec starts an additional process in a running container with
// `runtime exec --detach` and returns its pid.
func (a *Agent) Exec(ctx context.Context, req *api.ExecProcessRequest) (_ uint32, retErr error) {
	id, execID := req.GetId(), req.GetExecId()
	if err := validateID("exec id", execID); err != nil {
		return 0, err
	}
	spec, err := decodeProcess(req.GetProcess(), req.GetStdio().GetTerminal())
	if err != nil {
		return 0, err
	}
	c, err := a.lockedContainer(ctx, id)
	if err != nil {
		return 0, err
	}
	defer c.unlock()
	if err := c.require("exec in", statusRunning); err != nil {
		return 0, err
	}
	if err := c.reserveExec(execID); err != nil {
		return 0, err
	}
	defer func() {
		if retErr != nil {
			c.dropExec(execID)
		}
	}()
	uid, gid := hostIDs(c.linux, spec.User)
	stdio, err := newStdioSetup(req.GetStdio(), uid, gid)
	if err != nil {
		return 0, err
	}
	defer stdio.Close()
	pidFile := filepath.Join(c.bundle, "exec-"+execID+".pid")
	since := time.Now()
	// Execs run one at a time (c.op), so they can share one log file.
	err = c.run(ctx, "exec", func(ctx context.Context, r *runc.Runc) error {
		return r.Exec(ctx, id, *spec, stdio.execOpts(pidFile))
	})
	if err != nil {
		// An exec racing the init's death fails inside the runtime (its
		// namespaces are going): that is the container not running.
		if reaper.Exiting(c.init.pid) {
			if ok, _ := waitExited(ctx, c.init, execRaceGrace); ok {
				return 0, fmt.Errorf("exec %s in container %s: its init exited meanwhile (%v): %w", execID, id, err, errdefs.ErrFailedPrecondition)
			}
		}
		return 0, err
	}
	pid, err := runc.ReadPidFile(pidFile)
	_ = os.Remove(pidFile)
	if err != nil {
		return 0, fmt.Errorf("read pid of exec %s: %w", execID, err)
	}
	handle := a.reaper.Claim(pid, since)
	ps, err := stdio.finish()
	if err != nil {
		// The process runs without the terminal it asked for: stop it.
		_ = handle.Signal(unix.SIGKILL)
		return 0, err
	}
	p := newProcess(id, execID, handle, ps, c.oom.count())
	c.mu.Lock()
	c.execs[execID] = p
	c.mu.Unlock()
	go a.watchExit(c, p)
	log.G(ctx).WithField("id", id).WithField("exec_id", execID).WithField("pid", pid).Debug("exec started")
	return uint32(pid), nil
}

// reserveExec claims execID for an exec being started.
func (c *container) reserveExec(execID string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.execs[execID]; ok {
		return fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrAlreadyExists)
	}
	c.execs[execID] = nil
	return nil
}

// dropExec forgets execID.
func (c *container) dropExec(execID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.execs, execID)
}

// DeleteProcess forgets an exited exec process and its output.
func (a *Agent) DeleteProcess(ctx context.Context, id, execID string) error {
	if execID == "" {
		return fmt.Errorf("exec id is empty (the init process goes with DeleteContainer): %w", errdefs.ErrInvalidArgument)
	}
	c, p, err := a.process(id, execID)
	if err != nil {
		return err
	}
	if !p.hasExited() {
		return fmt.Errorf("exec %s in container %s is still running (pid %d): %w", execID, id, p.pid, errdefs.ErrFailedPrecondition)
	}
	c.mu.Lock()
	if c.execs[execID] != p {
		c.mu.Unlock()
		return fmt.Errorf("exec %s in container %s: %w", execID, id, errdefs.ErrNotFound)
	}
	delete(c.execs, execID)
	c.mu.Unlock()
	p.release()
	return nil
}

// execRaceGrace is how long a failed exec waits for a dying init to exit.
const execRaceGrace = 2 * time.Second

// Delete runs `runtime delete` (forced when asked), waits until every process
// of the container has been reaped, then unmounts the rootfs and removes the
// bundle. A running container needs force. Nothing is removed while one of
// its processes is still alive.
func (a *Agent) Delete(ctx context.Context, id string, force bool) error {
	c, err := a.lockedContainer(ctx, id)
	if err != nil {
		return err
	}
	defer c.unlock()
	if !force {
		if err := c.require("delete", statusCreated, statusStopped); err != nil {
			return fmt.Errorf("%w (force deletes a live container)", err)
		}
		if live := c.liveExecs(); len(live) > 0 {
			return fmt.Errorf("cannot delete container %s: exec %s is still running: %w", id, live[0].execID, errdefs.ErrFailedPrecondition)
		}
	}
	err = c.run(ctx, "delete", func(ctx context.Context, r *runc.Runc) error {
		return r.Delete(ctx, id, &runc.DeleteOpts{Force: force})
	})
	if err != nil && !isNotExist(err) {
		return err
	}
	if err := a.reapAll(ctx, c); err != nil {
		return err
	}
	a.destroy(c)
	return nil
}

// liveExecs returns the execs that have not exited.
func (c *container) liveExecs() []*process {
	var live []*process
	for _, p := range c.processes()[1:] {
		if !p.hasExited() {
			live = append(live, p)
		}
	}
	return live
}

// reapAll waits until every process of c has been reaped and its exit
// recorded. A process still alive after reapTimeout gets SIGKILL and a second
// bound; if it survives that too, the error names it.
func (a *Agent) reapAll(ctx context.Context, c *container) error {
	for _, p := range c.processes() {
		ok, err := waitExited(ctx, p, reapTimeout)
		if err != nil {
			return err
		}
		if ok {
			continue
		}
		log.G(ctx).WithField("id", c.id).WithField("pid", p.pid).Warn("process outlived delete: killing it")
		_ = p.handle.Signal(unix.SIGKILL)
		if ok, err := waitExited(ctx, p, reapTimeout); err != nil {
			return err
		} else if !ok {
			return fmt.Errorf("process %s (pid %d) is still alive: %w", p.name(), p.pid, errdefs.ErrFailedPrecondition)
		}
	}
	return nil
}

// waitExited waits up to d for p's exit to be recorded.
func waitExited(ctx context.Context, p *process, d time.Duration) (bool, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.exited:
		return true, nil
	case <-t.C:
		return false, nil
	case <-ctx.Done():
		return false, fmt.Errorf("wait for pid %d of %s: %w", p.pid, p.name(), ctx.Err())
	}
}

// destroy removes a container whose processes are all reaped: its stdio,
// OOM watch, rootfs mount and bundle.
func (a *Agent) destroy(c *container) {
	c.setStatus(statusDeleting)
	a.publish(c.id, nil)
	for _, p := range c.processes() {
		p.release()
	}
	if c.stopOOMWatch != nil {
		c.stopOOMWatch()
	}
	unmount(c.rootfs)
	_ = os.Remove(c.rootfs)
	_ = os.RemoveAll(c.bundle)
	removePodShm(c)
}
