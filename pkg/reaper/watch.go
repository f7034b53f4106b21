package reaper

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Watch returns a channel that is closed once the process id names has exited:
// for our child, once the SIGCHLD loop reaped it (so no zombie remains when it closes);
// for any other process, once it is gone (pidfd readable). A process that is already
// gone, or whose start time does not match id (pid reused), gives a closed channel at once.
// stop releases the watch (the channel then may never close); call it when no longer interested.
//
// Watch only observes: it never takes an exit status, so a Process handle
// or a later Claim of the pid still receives it, and it neither creates nor
// releases handles, so stop cannot drop anyone else's registration and
// nobody's Release can silence a Watch. A child costs an entry in a map that
// the loop consults; any other process costs one pidfd, waited on by the
// runtime's netpoller (no thread blocked per watch), and one parked
// goroutine that returns when the process exits or stop is called. stop is
// idempotent and, when it returns, the pidfd is closed.
//
// A non-child that becomes our child before it exits (reparented to this
// subreaper when its parent died) is treated as our child: the channel
// closes once the loop reaped it.
func (r *Reaper) Watch(id Identity) (exited <-chan struct{}, stop func(), err error) {
	if id.Pid <= 0 {
		return nil, nil, fmt.Errorf("watch: invalid pid %d", id.Pid)
	}
	st, same, err := id.stat()
	if err != nil {
		return nil, nil, fmt.Errorf("watch pid %d: %w", id.Pid, err)
	}
	if !same {
		return gone()
	}
	if st.ppid == os.Getpid() {
		return r.watchChild(id)
	}
	return r.watchPidfd(id)
}

// gone is Watch's answer for a process that has already exited.
func gone() (<-chan struct{}, func(), error) {
	ch := make(chan struct{})
	close(ch)
	return ch, func() {}, nil
}

// childWatch is a Watch on a child of ours.
type childWatch struct {
	// id is the watched process.
	id Identity
	// done is closed when the process has been reaped, by whoever removes
	// the watch from Reaper.watchers (holding Reaper.mu), so exactly once.
	done chan struct{}
}

// watchChild watches a child of ours: the loop's deliver closes the channel
// once it reaped id's process.
func (r *Reaper) watchChild(id Identity) (<-chan struct{}, func(), error) {
	w := &childWatch{id: id, done: make(chan struct{})}
	r.mu.Lock()
	if r.watchers == nil {
		r.watchers = make(map[int][]*childWatch)
	}
	r.watchers[id.Pid] = append(r.watchers[id.Pid], w)
	r.mu.Unlock()
	// Registered first, checked second. Only our loop reaps our children,
	// and a reaped process leaves /proc before wait4 returns: if id is still
	// there now, its exit is delivered after w was registered and deliver
	// closes w; if it is gone, the loop reaped it already.
	same, err := id.Exists()
	if err != nil {
		r.unwatch(w, false)
		return nil, nil, fmt.Errorf("watch pid %d: %w", id.Pid, err)
	}
	if !same {
		r.unwatch(w, true)
	}
	return w.done, func() { r.unwatch(w, false) }, nil
}

// unwatch removes w if it is still registered, and then closes its channel
// if fire is set. A watch that deliver already closed is left alone.
func (r *Reaper) unwatch(w *childWatch, fire bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ws := r.watchers[w.id.Pid]
	i := slices.Index(ws, w)
	if i < 0 {
		return
	}
	if ws = slices.Delete(ws, i, i+1); len(ws) == 0 {
		delete(r.watchers, w.id.Pid)
	} else {
		r.watchers[w.id.Pid] = ws
	}
	if fire {
		close(w.done)
	}
}

// fireWatchersLocked closes the watches on pid, which the loop has just
// reaped. A watch whose process is still in /proc stays: it names a newer
// process that reused pid before this older exit was delivered, and waits
// for that process's own reap.
func (r *Reaper) fireWatchersLocked(pid int) {
	ws := r.watchers[pid]
	if len(ws) == 0 {
		return
	}
	st, err := readProcStat(pid)
	keep := ws[:0]
	for _, w := range ws {
		if err == nil && st.startTime == w.id.StartTime {
			keep = append(keep, w)
			continue
		}
		close(w.done)
	}
	clear(ws[len(keep):])
	if len(keep) == 0 {
		delete(r.watchers, pid)
	} else {
		r.watchers[pid] = keep
	}
}

// watchPidfd watches a process that is not our child through a pidfd, which
// becomes readable when the process exits whoever its parent is.
func (r *Reaper) watchPidfd(id Identity) (<-chan struct{}, func(), error) {
	fd, err := unix.PidfdOpen(id.Pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return gone()
	}
	if err != nil {
		return nil, nil, os.NewSyscallError("pidfd_open", err)
	}
	// A non-blocking fd becomes a pollable file: the netpoller waits on it.
	f := os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(id.Pid))
	// The pid may have been reused between the stat and pidfd_open. The
	// pidfd holds whatever process it opened; if the pid still has id's
	// start time, that process is id's.
	same, err := id.Exists()
	if err != nil || !same {
		f.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("watch pid %d: %w", id.Pid, err)
		}
		return gone()
	}
	// Only a file in the netpoller has deadlines: refuse one that is not
	// rather than block a thread per watch.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("watch pid %d: pidfd not pollable: %w", id.Pid, err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("watch pid %d: %w", id.Pid, err)
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	// Close waits until no Read uses the fd any more, so the fd is closed
	// when closeFile returns, whoever called it first.
	closeFile := sync.OnceFunc(func() { f.Close() })
	go r.awaitPidfd(id, rc, closeFile, stopped, done)
	return done, sync.OnceFunc(func() {
		close(stopped)
		closeFile()
	}), nil
}

// awaitPidfd waits, parked in the netpoller, until the pidfd in rc is
// readable or stop closed it. An exited process that is a zombie child of
// ours by then (it was reparented to us) is waited for until the loop reaped
// it. It always returns, and closes the pidfd before it does.
func (r *Reaper) awaitPidfd(id Identity, rc syscall.RawConn, closeFile func(), stopped <-chan struct{}, done chan<- struct{}) {
	defer closeFile()
	ours := false
	err := rc.Read(func(fd uintptr) bool {
		if !pidfdReadable(int(fd)) {
			return false
		}
		ours = zombieChild(int(fd))
		return true
	})
	select {
	case <-stopped:
		return
	default:
	}
	if err != nil {
		log.L.WithError(err).WithField("pid", id.Pid).Error("watch: waiting on pidfd failed")
		return
	}
	closeFile()
	if ours {
		exited, stopChild, err := r.watchChild(id)
		if err != nil {
			log.L.WithError(err).WithField("pid", id.Pid).Error("watch: cannot watch reparented child")
			return
		}
		select {
		case <-exited:
		case <-stopped:
			stopChild()
			return
		}
	}
	close(done)
}

// pidfdReadable reports, without blocking, whether the process behind the
// pidfd has exited (readable; hung up once it has been reaped).
func pidfdReadable(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n > 0 && fds[0].Revents&(unix.POLLIN|unix.POLLHUP) != 0
	}
}

// zombieChild reports whether the exited process behind the pidfd is a child
// of ours that the loop has not reaped yet. WNOWAIT leaves it for the loop.
func zombieChild(fd int) bool {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil
	}
}
