package reaper

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Outcome is the result of a bounded Reap.
type Outcome int

const (
	// Reaped: the process exited and the reaper collected its status.
	Reaped Outcome = iota + 1
	// TimedOut: the process was still alive at the deadline.
	TimedOut
	// NotOurChild: the process is gone (or went away before the deadline)
	// but it was not our child, so no status could be collected. This is a
	// verified death, for example of a VMM whose shim was restarted.
	NotOurChild
)

func (o Outcome) String() string {
	switch o {
	case Reaped:
		return "reaped"
	case TimedOut:
		return "timed out"
	case NotOurChild:
		return "not our child"
	}
	return fmt.Sprintf("outcome(%d)", int(o))
}

// Reap waits until pid has exited or the deadline passes, without sleep
// loops. For a child it waits on the SIGCHLD loop's delivery; for any other
// process it polls a pidfd, which reports the exit of non-children too.
// Destructive cleanup may follow Reaped and NotOurChild, never TimedOut.
func (r *Reaper) Reap(pid int, deadline time.Time) (Outcome, Exit, error) {
	if pid <= 0 {
		return 0, Exit{}, fmt.Errorf("reap: invalid pid %d", pid)
	}
	if p, ok := r.tracked(pid); ok {
		return waitDone(p, deadline)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		// Gone already: if the loop reaped it, report its status.
		return r.reapedBefore(pid)
	}
	if err != nil {
		return 0, Exit{}, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(fd)

	if !pollReadable(fd, deadline) {
		return TimedOut, Exit{}, nil
	}
	// It exited. If it is our child the loop reaps it; claim its exit.
	var info unix.Siginfo
	err = unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	if errors.Is(err, unix.ECHILD) {
		return r.reapedBefore(pid)
	}
	return waitDone(r.Claim(pid, time.Now().Add(-orphanTTL)), deadline)
}

// reapedBefore reports the exit of pid, which is no longer in the process
// table: Reaped with its status if the loop reaped it recently (an orphan's
// exit is taken, one delivered to a handle stays for the handle's owner),
// NotOurChild otherwise.
func (r *Reaper) reapedBefore(pid int) (Outcome, Exit, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := r.recentLocked(pid, time.Now().Add(-orphanTTL))
	if i < 0 {
		return NotOurChild, Exit{}, nil
	}
	e := r.recent[i]
	if !e.delivered {
		r.recent = append(r.recent[:i], r.recent[i+1:]...)
	}
	return Reaped, e.Exit, nil
}

func waitDone(p *Process, deadline time.Time) (Outcome, Exit, error) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-p.Done():
		p.join()
		e, _ := p.Exit()
		return Reaped, e, nil
	case <-t.C:
		return TimedOut, Exit{}, nil
	}
}

// pollReadable reports whether the pidfd became readable (the process
// exited) before the deadline.
func pollReadable(fd int, deadline time.Time) bool {
	for {
		ms := time.Until(deadline).Milliseconds()
		if ms < 0 {
			ms = 0
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(min(ms, 1<<30)))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			return false
		}
		return true
	}
}
