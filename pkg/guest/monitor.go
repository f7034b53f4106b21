package guest

import (
	"context"
	"os/exec"
	"runtime"

	runc "github.com/containerd/go-runc"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// reaperMonitor is go-runc's ProcessMonitor on the project reaper: every
// runtime command is started through the reaper and its exit comes from the
// single SIGCHLD loop, so neither go-runc nor exec.Cmd ever calls wait.
type reaperMonitor struct {
	// r is the reaper every runtime command is started through.
	r *reaper.Reaper
}

var _ runc.ProcessMonitor = (*reaperMonitor)(nil)

// Start starts c through the reaper and returns a channel that receives its
// exit once.
func (m *reaperMonitor) Start(c *exec.Cmd) (chan runc.Exit, error) {
	p, err := m.r.Start(c)
	if err != nil {
		return nil, err
	}
	ec := make(chan runc.Exit, 1)
	go func() {
		ec <- waitExit(p)
		close(ec)
	}()
	return ec, nil
}

// StartLocked is Start with the starting goroutine locked to its OS thread
// until the process exits, for commands with a parent-death signal.
func (m *reaperMonitor) StartLocked(c *exec.Cmd) (chan runc.Exit, error) {
	started := make(chan error, 1)
	ec := make(chan runc.Exit, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		p, err := m.r.Start(c)
		started <- err
		if err != nil {
			return
		}
		ec <- waitExit(p)
		close(ec)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return ec, nil
}

// Wait returns the exit status received on ec: the exit code, or 128+n for
// a process killed by signal n.
func (m *reaperMonitor) Wait(_ *exec.Cmd, ec chan runc.Exit) (int, error) {
	e := <-ec
	return e.Status, nil
}

// waitExit waits for p (which also joins exec's stdio copying) and converts
// its exit.
func waitExit(p *reaper.Process) runc.Exit {
	e, _ := p.Wait(context.Background())
	return runc.Exit{Timestamp: e.Time, Pid: e.Pid, Status: e.Status}
}
