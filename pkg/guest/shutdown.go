package guest

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// shutdownReapTimeout bounds the wait for killed containers at shutdown.
const shutdownReapTimeout = 5 * time.Second

// Shutdown prepares the guest to be switched off: long polls return, every
// container is killed (SIGKILL to its whole cgroup) and reaped, rootfs
// shares are unmounted and filesystems synced. Then Stopped is closed; the
// caller reboots once the reply has been written. Later calls do nothing.
func (a *Agent) Shutdown(ctx context.Context) {
	a.shutdownOnce.Do(func() {
		a.mu.Lock()
		a.stop() // under mu: no container is created after this
		a.mu.Unlock()
		unix.Sync()
		var wg sync.WaitGroup
		for _, c := range a.all() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				a.killContainer(ctx, c)
			}()
		}
		wg.Wait()
		unix.Sync()
		close(a.stopped)
	})
}

// killContainer kills every process of c, waits (bounded) for their exits
// and unmounts c's rootfs.
func (a *Agent) killContainer(ctx context.Context, c *container) {
	l := log.G(ctx).WithField("id", c.id)
	if m, err := cgroup2.Load(c.cgroup, cgroup2.WithMountpoint(a.cfg.cgroupRoot)); err == nil {
		if err := m.Kill(); err != nil {
			l.WithError(err).Warn("kill cgroup")
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownReapTimeout)
	defer cancel()
	for _, p := range c.processes() {
		if p.hasExited() {
			continue
		}
		_ = p.handle.Signal(unix.SIGKILL)
		if ok, _ := waitExited(ctx, p, shutdownReapTimeout); !ok {
			l.WithField("pid", p.pid).Warn("process still alive at shutdown")
		}
	}
	unmount(c.rootfs)
}
