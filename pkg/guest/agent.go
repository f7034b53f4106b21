package guest

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Version is the agent's version, reported by Ping.
var Version = "dev"

// config holds the Agent's settings; see the Option functions.
type config struct {
	// stateDir holds bundles, rootfs mounts and the runtime's state.
	stateDir string
	// cgroupRoot is where cgroup2 is mounted.
	cgroupRoot string
	// bootTime is how long the guest took to start serving.
	bootTime time.Duration
	// reseedRequired makes Create wait for host entropy (WithReseedRequired).
	reseedRequired bool
}

// Option configures an Agent.
type Option func(*config) error

// WithStateDir sets the directory for bundles, rootfs mounts and runtime
// state (default /run/boxlite).
func WithStateDir(dir string) Option {
	return func(c *config) error {
		if !filepath.IsAbs(dir) {
			return fmt.Errorf("state dir %q is not absolute: %w", dir, errdefs.ErrInvalidArgument)
		}
		c.stateDir = dir
		return nil
	}
}

// WithCgroupRoot sets where cgroup2 is mounted (default /sys/fs/cgroup).
func WithCgroupRoot(dir string) Option {
	return func(c *config) error {
		if !filepath.IsAbs(dir) {
			return fmt.Errorf("cgroup root %q is not absolute: %w", dir, errdefs.ErrInvalidArgument)
		}
		c.cgroupRoot = dir
		return nil
	}
}

// WithBootTime sets the boot time reported by Ping.
func WithBootTime(d time.Duration) Option {
	return func(c *config) error {
		c.bootTime = d
		return nil
	}
}

// Agent runs the containers of one guest. Its methods implement the agent
// API with errdefs-classified errors; NewService puts them on the wire.
type Agent struct {
	// cfg is fixed at construction.
	cfg config
	// rt is the OCI runtime binary.
	rt Runtime
	// reaper reaps every process of the guest.
	reaper *reaper.Reaper
	// events is the ring of EXIT and OOM events.
	events *eventRing
	// stopCtx is cancelled when Shutdown begins: long polls return early.
	stopCtx context.Context
	// stop cancels stopCtx.
	stop context.CancelFunc
	// stopped is closed when Shutdown has finished its work.
	stopped chan struct{}
	// shutdownOnce runs Shutdown's work once.
	shutdownOnce sync.Once
	// reseeded says a ping with host entropy reseeded the guest's random
	// number generator.
	reseeded atomic.Bool
	// reseed adds host entropy (the kernel's ioctls; replaced in tests).
	reseed func([]byte) error

	// shareMu guards shares.
	shareMu sync.Mutex
	// shares says which share tags are mounted. Guarded by shareMu.
	shares map[string]bool

	// mu guards containers.
	mu sync.Mutex
	// containers maps an id to its container; a nil value reserves an id
	// whose creation is in progress. Guarded by mu.
	containers map[string]*container
}

// New returns an Agent that runs containers with rt and reaps through r.
func New(rt Runtime, r *reaper.Reaper, opts ...Option) (*Agent, error) {
	cfg := config{stateDir: "/run/boxlite", cgroupRoot: "/sys/fs/cgroup"}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Agent{
		cfg:        cfg,
		rt:         rt,
		reaper:     r,
		events:     newEventRing(eventRingSize),
		stopCtx:    ctx,
		stop:       cancel,
		stopped:    make(chan struct{}),
		containers: map[string]*container{},
		shares:     map[string]bool{},
		reseed:     reseed,
	}, nil
}

// Reseed adds host entropy to the guest's pool and reseeds its random
// number generator; from then on Create runs containers.
func (a *Agent) Reseed(b []byte) error {
	if err := a.reseed(b); err != nil {
		return err
	}
	a.reseeded.Store(true)
	return nil
}

// Stopped is closed once Shutdown has done its work; the caller reboots.
func (a *Agent) Stopped() <-chan struct{} { return a.stopped }

func (a *Agent) bundleDir(id string) string { return filepath.Join(a.cfg.stateDir, "bundles", id) }
func (a *Agent) rootfsDir(id string) string { return filepath.Join(a.cfg.stateDir, "rootfs", id) }
func (a *Agent) runtimeRoot() string        { return filepath.Join(a.cfg.stateDir, "runtime") }

// cgroupPath is the cgroup of container id, relative to the cgroup root.
func cgroupPath(id string) string { return "/boxlite/" + id }

// Ping describes the agent.
func (a *Agent) Ping(context.Context) *api.PingResponse {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	return &api.PingResponse{
		Version: Version,
		Runtime: a.rt.Name,
		Kernel:  unix.ByteSliceToString(uts.Release[:]),
		BootNs:  a.cfg.bootTime.Nanoseconds(),
	}
}

// reserve claims id for a container being created.
func (a *Agent) reserve(id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopCtx.Err() != nil {
		return fmt.Errorf("agent is shutting down: %w", errdefs.ErrFailedPrecondition)
	}
	if _, ok := a.containers[id]; ok {
		return fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	a.containers[id] = nil
	return nil
}

// publish replaces the reservation of c.id with c, or drops the reservation
// when c is nil.
func (a *Agent) publish(id string, c *container) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c == nil {
		delete(a.containers, id)
		return
	}
	a.containers[id] = c
}

// container returns the container id.
func (a *Agent) container(id string) (*container, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.containers[id]
	if c == nil {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

// lockedContainer returns container id holding its lock (bounded by ctx);
// the caller unlocks it.
func (a *Agent) lockedContainer(ctx context.Context, id string) (*container, error) {
	c, err := a.container(id)
	if err != nil {
		return nil, err
	}
	if err := c.lock(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// process returns the init (execID empty) or an exec of container id.
func (a *Agent) process(id, execID string) (*container, *process, error) {
	c, err := a.container(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.process(execID)
	return c, p, err
}

// all returns every container.
func (a *Agent) all() []*container {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*container, 0, len(a.containers))
	for _, c := range a.containers {
		if c != nil {
			out = append(out, c)
		}
	}
	return out
}

// watchExit records p's exit once the reaper delivers it.
func (a *Agent) watchExit(c *container, p *process) {
	<-p.handle.Done()
	e, _ := p.handle.Exit()
	if p.execID == "" && c.sharedPID {
		a.killRest(c)
	}
	a.recordExit(c, p, e.Status, e.Time)
}

// recordExit records an exit and publishes it. An OOM kill the container's
// cgroup recorded meanwhile is published first: the OOM event always
// precedes the EXIT event of the process it killed.
func (a *Agent) recordExit(c *container, p *process, status int, at time.Time) {
	kills := c.oom.check()
	rec := exitRecord{status: uint32(status), at: at, oomKilled: kills > p.oomBase}
	if p.execID == "" {
		c.setStatus(statusStopped)
	}
	a.events.add(&api.Event{
		Kind:       api.EventKind_EXIT,
		Id:         c.id,
		ExecId:     p.execID,
		Pid:        uint32(p.pid),
		ExitStatus: rec.status,
		TimeUnixNs: at.UnixNano(),
	})
	p.setExit(rec)
	log.L.WithField("id", c.id).WithField("exec_id", p.execID).WithField("pid", p.pid).
		WithField("status", status).WithField("oom", rec.oomKilled).Debug("process exited")
}

// oomReporter returns the report function of container id's OOM counter.
func (a *Agent) oomReporter(id string, pid int) func(uint64) {
	return func(count uint64) {
		a.events.add(&api.Event{
			Kind:       api.EventKind_OOM,
			Id:         id,
			Pid:        uint32(pid),
			TimeUnixNs: time.Now().UnixNano(),
		})
		log.L.WithField("id", id).WithField("oom_kills", count).Info("oom kill")
	}
}

// pollContext bounds a long poll by ctx and by the agent's shutdown.
func (a *Agent) pollContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(a.stopCtx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// Events returns the events after `after`, waiting up to wait for one.
func (a *Agent) Events(ctx context.Context, after uint64, wait time.Duration) (*api.EventsResponse, error) {
	ctx, cancel := a.pollContext(ctx)
	defer cancel()
	evs, missed, err := a.events.Wait(ctx, after, wait)
	if err != nil {
		return nil, err
	}
	return &api.EventsResponse{Events: evs, Missed: missed}, nil
}

// cleanups is an undo stack: functions run in reverse order unless released.
type cleanups []func()

// add pushes an undo step.
func (c *cleanups) add(fn func()) { *c = append(*c, fn) }

// run undoes every step, newest first.
func (c *cleanups) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
	*c = nil
}

// release forgets every step: the work is kept.
func (c *cleanups) release() { *c = nil }
