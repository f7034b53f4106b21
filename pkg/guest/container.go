package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// status is a container's lifecycle state.
type status string

// The container lifecycle: created → running ⇄ paused; any → stopped when the
// init process exits; deleting once DeleteContainer has begun.
const (
	statusCreated  status = "created"
	statusRunning  status = "running"
	statusPaused   status = "paused"
	statusStopped  status = "stopped"
	statusDeleting status = "deleting"
)

// runtimeTimeout bounds one runtime command. It is not tied to the host's
// request: a runtime killed halfway would leave half a container behind.
const runtimeTimeout = 2 * time.Minute

// container is one OCI container in the guest.
type container struct {
	// id is the container id.
	id string
	// bundle is the OCI bundle directory.
	bundle string
	// rootfs is where the rootfs share is mounted.
	rootfs string
	// cgroup is the container's cgroup, relative to the cgroup root.
	cgroup string
	// rt is the OCI runtime.
	rt Runtime
	// runtimeRoot is the runtime's --root.
	runtimeRoot string
	// linux holds the spec's user namespace mappings (nil without).
	linux *specs.Linux
	// init is the container's init process.
	init *process
	// podShm is the pod's /dev/shm that this sandbox container made (empty
	// for others); it goes with the container.
	podShm string
	// sharedPID says the container joined its pod's pid namespace.
	sharedPID bool
	// oom follows the cgroup's oom_kill counter.
	oom *oomCounter
	// stopOOMWatch stops watching oom's file (nil when not watched).
	stopOOMWatch func()
	// op holds one token: lifecycle operations (start, exec, pause, resume,
	// delete) take it, so they run one at a time and can give up on ctx.
	op chan struct{}

	// mu guards status and execs.
	mu sync.Mutex
	// status is the lifecycle state. Guarded by mu.
	status status
	// execs maps an exec id to its process; a nil value reserves an id
	// whose exec is in progress. Guarded by mu.
	execs map[string]*process
}

// lock takes the operation token, or fails when ctx is done first.
func (c *container) lock(ctx context.Context) error {
	select {
	case <-c.op:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *container) unlock() { c.op <- struct{}{} }

// getStatus returns the lifecycle state.
func (c *container) getStatus() status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status
}

// setStatus moves to s; stopped and deleting are never left for an earlier
// state.
func (c *container) setStatus(s status) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status == statusDeleting || (c.status == statusStopped && s != statusDeleting) {
		return
	}
	c.status = s
}

// require fails with ErrFailedPrecondition unless the state is one of ok.
func (c *container) require(op string, ok ...status) error {
	if s := c.getStatus(); !slices.Contains(ok, s) {
		return fmt.Errorf("cannot %s container %s in %s state: %w", op, c.id, s, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// process returns the init (execID empty) or exec execID.
func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.execs[execID]
	if p == nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// processes returns the init and every exec.
func (c *container) processes() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := []*process{c.init}
	for _, p := range c.execs {
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

// run runs one runtime command through a client logging to <op>.log in the
// bundle, and adds the runtime's own error messages to a failure.
func (c *container) run(ctx context.Context, op string, fn func(context.Context, *runc.Runc) error) error {
	return runRuntime(ctx, c.rt, c.runtimeRoot, filepath.Join(c.bundle, op+".log"), op, fn)
}

// runRuntime runs fn with a runtime client logging to logFile.
func runRuntime(ctx context.Context, rt Runtime, root, logFile, op string, fn func(context.Context, *runc.Runc) error) error {
	_ = os.Remove(logFile)
	start := time.Now()
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), runtimeTimeout)
	defer cancel()
	err := fn(rctx, rt.client(root, logFile))
	log.G(ctx).WithField("op", op).WithField("took", time.Since(start).Round(time.Millisecond)).Debug(rt.Name)
	if err != nil {
		return runtimeError(rt.Name+" "+op, err, logFile)
	}
	return nil
}

// hostIDs returns the guest uid and gid of a process's user, through the
// user namespace mappings of linux when it has them.
func hostIDs(linux *specs.Linux, user specs.User) (int, int) {
	var uidMaps, gidMaps []specs.LinuxIDMapping
	if linux != nil {
		uidMaps, gidMaps = linux.UIDMappings, linux.GIDMappings
	}
	return mapID(user.UID, uidMaps), mapID(user.GID, gidMaps)
}

// mapID maps a container id to the host side of maps (identity without).
func mapID(id uint32, maps []specs.LinuxIDMapping) int {
	for _, m := range maps {
		if id >= m.ContainerID && id-m.ContainerID < m.Size {
			return int(m.HostID + id - m.ContainerID)
		}
	}
	return int(id)
}
