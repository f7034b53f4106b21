package guest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// reapTimeout bounds the wait for a container's processes to be reaped
// after the runtime killed them.
const reapTimeout = 10 * time.Second

// Create mounts the rootfs share, writes the bundle and runs `runtime create`.
// The init process exists but has not started; its pid is returned.
func (a *Agent) Create(ctx context.Context, req *api.CreateContainerRequest) (_ uint32, retErr error) {
	id := req.GetId()
	if err := validateID("container id", id); err != nil {
		return 0, err
	}
	if a.cfg.reseedRequired && !a.reseeded.Load() {
		return 0, errNotReseeded
	}
	if err := a.reserve(id); err != nil {
		return 0, err
	}
	var undo cleanups
	defer func() {
		if retErr != nil {
			undo.run()
			a.publish(id, nil)
		}
	}()
	c := a.newContainer(id)
	uid, gid, err := a.prepareBundle(c, req, &undo)
	if err != nil {
		return 0, err
	}
	stdio, err := newStdioSetup(req.GetStdio(), uid, gid)
	if err != nil {
		return 0, err
	}
	defer stdio.Close()

	pidFile := filepath.Join(c.bundle, "init.pid")
	since := time.Now()
	err = c.run(ctx, "create", func(ctx context.Context, r *runc.Runc) error {
		o := stdio.createOpts(pidFile)
		o.NoNewKeyring, o.NoPivot = req.GetNoNewKeyring(), req.GetNoPivotRoot()
		return r.Create(ctx, id, c.bundle, o)
	})
	// On any failure from here, the runtime may have left state behind.
	undo.add(func() {
		_ = c.run(ctx, "delete", func(ctx context.Context, r *runc.Runc) error {
			return r.Delete(ctx, id, &runc.DeleteOpts{Force: true})
		})
	})
	if err != nil {
		return 0, err
	}
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		return 0, fmt.Errorf("read init pid of %s: %w", id, err)
	}
	handle := a.reaper.Claim(pid, since)
	ps, err := stdio.finish()
	if err != nil {
		return 0, err
	}
	a.watchOOM(ctx, c, pid)
	c.init = newProcess(id, "", handle, ps, c.oom.count())
	go a.watchExit(c, c.init)
	undo.release()
	a.publish(id, c)
	log.G(ctx).WithField("id", id).WithField("pid", pid).Debug("container created")
	return uint32(pid), nil
}

// newContainer returns the state of a container being created.
func (a *Agent) newContainer(id string) *container {
	c := &container{
		id:          id,
		bundle:      a.bundleDir(id),
		rootfs:      a.rootfsDir(id),
		cgroup:      cgroupPath(id),
		rt:          a.rt,
		runtimeRoot: a.runtimeRoot(),
		op:          make(chan struct{}, 1),
		status:      statusCreated,
		execs:       map[string]*process{},
	}
	c.op <- struct{}{}
	return c
}

// watchOOM starts following the oom_kill counter of c's cgroup, which the
// runtime has just created; pid is the init's.
func (a *Agent) watchOOM(ctx context.Context, c *container, pid int) {
	c.oom = newOOMCounter(filepath.Join(a.cfg.cgroupRoot, c.cgroup, "memory.events"), a.oomReporter(c.id, pid))
	stop, err := c.oom.watch()
	if err != nil {
		// Exits still check for OOM kills; only early OOM events are lost.
		log.G(ctx).WithError(err).WithField("id", c.id).Warn("cannot watch oom kills")
		return
	}
	c.stopOOMWatch = stop
}

// prepareBundle validates the spec, binds the rootfs from the share and
// writes config.json. It returns the guest uid and gid of the init's user.
func (a *Agent) prepareBundle(c *container, req *api.CreateContainerRequest, undo *cleanups) (uid, gid int, err error) {
	share, err := a.share(req.GetShareTag())
	if err != nil {
		return 0, 0, err
	}
	rootfs, err := sharePath(share, "rootfs", req.GetRootfs())
	if err != nil {
		return 0, 0, err
	}
	sources, err := sharedSources(share, req.GetSharedMounts())
	if err != nil {
		return 0, 0, err
	}
	submounts, err := sharedSubmounts(share, req.GetSharedMounts())
	if err != nil {
		return 0, 0, err
	}
	pod, err := a.podFor(c, req, undo)
	if err != nil {
		return 0, 0, err
	}
	for _, i := range pod.shmMounts {
		if _, dup := sources[i]; dup {
			return 0, 0, fmt.Errorf("mount %d is both shared and the pod's /dev/shm: %w", i, errdefs.ErrInvalidArgument)
		}
		sources[i] = pod.shm
	}
	c.sharedPID = pod.sharedPID
	cfg, spec, err := rewriteSpec(req.GetSpec(), specEdit{
		rootPath:    c.rootfs,
		cgroupsPath: c.cgroup,
		terminal:    req.GetStdio().GetTerminal(),
		sources:     sources,
		submounts:   submounts,
		joins:       pod.joins,
	})
	if err != nil {
		return 0, 0, err
	}
	if err := os.MkdirAll(c.bundle, 0o700); err != nil {
		return 0, 0, err
	}
	undo.add(func() { os.RemoveAll(c.bundle) })
	if err := os.MkdirAll(c.rootfs, 0o755); err != nil {
		return 0, 0, err
	}
	undo.add(func() { os.Remove(c.rootfs) })
	if err := bindRootfs(rootfs, c.rootfs); err != nil {
		return 0, 0, err
	}
	undo.add(func() { unmount(c.rootfs) })
	if err := os.WriteFile(filepath.Join(c.bundle, "config.json"), cfg, 0o600); err != nil {
		return 0, 0, err
	}
	if spec.Linux != nil {
		c.linux = &specs.Linux{UIDMappings: spec.Linux.UIDMappings, GIDMappings: spec.Linux.GIDMappings}
	}
	uid, gid = hostIDs(c.linux, spec.Process.User)
	return uid, gid, nil
}

// mount9p mounts the 9p share tag at target.
func mount9p(tag, target string) error {
	const opts = "trans=virtio,version=9p2000.L,msize=512000,cache=none"
	err := unix.Mount(tag, target, "9p", unix.MS_NOSUID|unix.MS_NODEV, opts)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("mount 9p tag %q: no such share: %w", tag, errdefs.ErrNotFound)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("mount 9p tag %q: share already in use: %w", tag, errdefs.ErrFailedPrecondition)
	}
	return fmt.Errorf("mount 9p tag %q on %s: %w", tag, target, err)
}

// unmount unmounts target, detaching it when it is still busy.
func unmount(target string) {
	if err := unix.Unmount(target, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			log.L.WithError(err).WithField("path", target).Warn("unmount")
		}
	}
}

// Start runs `runtime start`; it returns the init's pid.
func (a *Agent) Start(ctx context.Context, id string) (uint32, error) {
	c, err := a.lockedContainer(ctx, id)
	if err != nil {
		return 0, err
	}
	defer c.unlock()
	if err := c.require("start", statusCreated); err != nil {
		return 0, err
	}
	if c.rt.Name == "crun" {
		start := time.Now()
		if err := startCrunContainer(c.runtimeRoot, id); err != nil {
			return 0, err
		}
		log.G(ctx).WithField("took", time.Since(start).Round(time.Microsecond)).Debug("start through exec.fifo")
	} else if err := c.run(ctx, "start", func(ctx context.Context, r *runc.Runc) error {
		return r.Start(ctx, id)
	}); err != nil {
		return 0, err
	}
	c.setStatus(statusRunning)
	return uint32(c.init.pid), nil
}
