package reaper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Exit is how a process ended.
type Exit struct {
	// Pid is the process id that exited.
	Pid int
	// Status is the exit code, or 128+n when the process was killed by signal n.
	Status int
	// Signal is the signal that killed the process, or 0.
	Signal syscall.Signal
	// Time is when the reaper collected the exit.
	Time time.Time
}

// String describes the exit for logs and errors.
func (e Exit) String() string {
	if e.Signal != 0 {
		return fmt.Sprintf("pid %d killed by %v (status %d)", e.Pid, e.Signal, e.Status)
	}
	return fmt.Sprintf("pid %d exited with status %d", e.Pid, e.Status)
}

// Bounds of the store of recent exits: Claim finds an exit nobody registered
// for (an orphan reparented to us) there, and Reap by pid any recent exit,
// for up to orphanTTL; the oldest entries are evicted first past maxOrphans.
const (
	maxOrphans = 4096
	orphanTTL  = 10 * time.Minute
)

// Reaper is the process-wide owner of wait. Use Default.
type Reaper struct {
	// mu guards waiting, recent, watchers.
	mu sync.Mutex
	// waiting maps a pid to the handle that receives its exit. Guarded by mu.
	waiting map[int]*Process
	// recent are the exits the loop reaped, oldest first: orphans (nobody
	// had registered the pid; Claim can take them) and exits delivered to
	// a handle (kept so that Reap by pid still reports one delivered just
	// before it looked). Guarded by mu.
	recent []recentExit
	// watchers are the Watches on children of ours, by pid; deliver closes
	// them (watch.go). Guarded by mu.
	watchers map[int][]*childWatch

	// reaped counts reaped processes; tests and benchmarks read it.
	reaped uint64
	// ownOnly is FaultNoReapEnv's fault: reap only registered processes.
	ownOnly bool
}

// FaultNoReapEnv, set to 1 in a process's environment, makes Default a
// subreaper that never reaps: fault injection for the tests that prove a
// missing reap is seen (each leaves zombies until its process exits).
const FaultNoReapEnv = "BOXLITE_FAULT_NO_REAP"

var (
	defaultOnce   sync.Once
	defaultReaper *Reaper
)

// Default returns the process-wide reaper. The first call marks the process a
// child subreaper (PR_SET_CHILD_SUBREAPER) and starts the single SIGCHLD loop;
// a process that fails to become a subreaper logs it and still reaps its own
// children.
func Default() *Reaper {
	defaultOnce.Do(func() {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			log.L.WithError(err).Warn("cannot become child subreaper")
		}
		defaultReaper = &Reaper{waiting: make(map[int]*Process), watchers: map[int][]*childWatch{}}
		if os.Getenv(FaultNoReapEnv) == "1" {
			// Fault injection: a subreaper that reaps only what it
			// started, so that tests can prove they would see the zombies
			// left by the processes that reparent to it.
			log.L.Warnf("%s=1: this process will NOT reap the processes that reparent to it (fault injection for tests)", FaultNoReapEnv)
			defaultReaper.ownOnly = true
		}
		ch := make(chan os.Signal, 32)
		signal.Notify(ch, unix.SIGCHLD)
		go defaultReaper.loop(ch)
		// Children may have exited before Notify was installed.
		defaultReaper.drain()
	})
	return defaultReaper
}

// loop is the single SIGCHLD loop. Signals coalesce, so each one drains every
// exited child.
func (r *Reaper) loop(ch <-chan os.Signal) {
	for range ch {
		r.drain()
	}
}

// drain reaps every exited child with wait4(-1, WNOHANG) until none is left.
func (r *Reaper) drain() {
	if r.ownOnly {
		r.drainOwn()
		return
	}
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			// ECHILD: no children; 0: none exited yet.
			return
		}
		r.deliver(exitFromStatus(pid, ws))
	}
}

// drainOwn reaps the processes Start started that exited, one wait4
// each, and leaves every other child a zombie, claimed or not
// (FaultNoReapEnv).
func (r *Reaper) drainOwn() {
	r.mu.Lock()
	pids := make([]int, 0, len(r.waiting))
	for pid, p := range r.waiting {
		if p.cmd != nil { // started, not claimed after reparenting
			pids = append(pids, pid)
		}
	}
	r.mu.Unlock()
	for _, pid := range pids {
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err == nil && got == pid {
			r.deliver(exitFromStatus(pid, ws))
		}
	}
}

// Environ is os.Environ without FaultNoReapEnv: a process started by one
// with the fault must not inherit it (the fault is the parent's alone).
func Environ() []string {
	env := os.Environ()
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, FaultNoReapEnv+"=") {
			out = append(out, kv)
		}
	}
	return out
}

func exitFromStatus(pid int, ws unix.WaitStatus) Exit {
	e := Exit{Pid: pid, Time: time.Now()}
	switch {
	case ws.Signaled():
		e.Signal = ws.Signal()
		e.Status = 128 + int(ws.Signal())
	case ws.Exited():
		e.Status = ws.ExitStatus()
	}
	return e
}

// recentExit is an exit in the recent store.
type recentExit struct {
	Exit
	// delivered says a registered handle received it; otherwise it is an
	// orphan's, which Claim may take.
	delivered bool
}

// deliver hands an exit to its registered handle, or stores it as an orphan.
// Either way it is kept in the recent store.
func (r *Reaper) deliver(e Exit) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reaped++
	p, ok := r.waiting[e.Pid]
	r.storeRecentLocked(e, ok)
	if ok {
		delete(r.waiting, e.Pid)
		p.finish(e)
	} else {
		log.L.WithField("pid", e.Pid).WithField("status", e.Status).Debug("reaped unregistered child")
	}
	// Watches only learn that the process is gone; they do not take its
	// exit, which stays for the handle or for a later Claim.
	r.fireWatchersLocked(e.Pid)
}

func (r *Reaper) storeRecentLocked(e Exit, delivered bool) {
	// Drop expired entries from the front (they are in exit order).
	cut := 0
	for cut < len(r.recent) && e.Time.Sub(r.recent[cut].Time) > orphanTTL {
		cut++
	}
	if len(r.recent)-cut >= maxOrphans {
		if evicted := r.recent[cut]; !evicted.delivered {
			log.L.WithField("pid", evicted.Pid).Warn("reaper: evicting unclaimed exit")
		}
		cut++
	}
	if cut > 0 {
		r.recent = append(r.recent[:0], r.recent[cut:]...)
	}
	r.recent = append(r.recent, recentExit{Exit: e, delivered: delivered})
}

// recentLocked returns the index of the newest stored exit of pid that
// happened at or after since, or -1.
func (r *Reaper) recentLocked(pid int, since time.Time) int {
	for i := len(r.recent) - 1; i >= 0; i-- {
		if e := r.recent[i]; e.Pid == pid {
			if e.Time.Before(since) {
				return -1
			}
			return i
		}
	}
	return -1
}

// takeOrphanLocked removes and returns the newest stored exit of pid that
// happened at or after since, if it is an orphan's (one delivered to a
// handle is not anyone else's to claim).
func (r *Reaper) takeOrphanLocked(pid int, since time.Time) (Exit, bool) {
	i := r.recentLocked(pid, since)
	if i < 0 || r.recent[i].delivered {
		return Exit{}, false
	}
	e := r.recent[i].Exit
	r.recent = append(r.recent[:i], r.recent[i+1:]...)
	return e, true
}

// Start starts cmd and registers it before it can exit, so its exit is
// delivered to the returned Process. cmd must not be waited for by anyone
// else. Stdio that is not an *os.File is allowed: Process.Wait joins exec's
// copying goroutines after the exit was reaped.
func (r *Reaper) Start(cmd *exec.Cmd) (*Process, error) {
	// Holding mu across Start means the loop can reap the child but cannot
	// deliver its exit before the pid is registered.
	r.mu.Lock()
	if err := cmd.Start(); err != nil {
		r.mu.Unlock()
		return nil, err
	}
	p := newProcess(cmd.Process.Pid, cmd)
	r.waiting[p.pid] = p
	r.mu.Unlock()
	// The start time is read after registration; a child that already
	// exited and was reaped keeps a zero start time.
	if id, err := ReadIdentity(p.pid); err == nil {
		p.identity = id
	}
	return p, nil
}

// Claim returns a handle on pid, a process that is or will be our child by
// reparenting (for example a container init whose pid a runtime wrote to a
// pid file). An exit of pid reaped at or after since, before Claim was
// called, is delivered too.
func (r *Reaper) Claim(pid int, since time.Time) *Process {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.waiting[pid]; ok {
		return p
	}
	p := newProcess(pid, nil)
	if e, ok := r.takeOrphanLocked(pid, since); ok {
		p.finish(e)
		return p
	}
	if id, err := ReadIdentity(pid); err == nil {
		p.identity = id
	}
	r.waiting[pid] = p
	return p
}

// Release forgets a claimed process whose exit nobody wants any more (for
// example a claim on a process that turned out not to be our child). Its
// exit, if it comes, is stored as an orphan.
func (r *Reaper) Release(p *Process) {
	r.mu.Lock()
	if cur, ok := r.waiting[p.pid]; ok && cur == p {
		delete(r.waiting, p.pid)
	}
	r.mu.Unlock()
}

// tracked returns the registered handle of pid, if any.
func (r *Reaper) tracked(pid int) (*Process, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.waiting[pid]
	return p, ok
}

// Reaped returns how many processes the loop has reaped so far.
func (r *Reaper) Reaped() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reaped
}

// Process is a handle on one child process and its exit.
type Process struct {
	pid      int
	identity Identity
	cmd      *exec.Cmd
	done     chan struct{}
	// joinOnce runs join once; concurrent callers wait for it.
	joinOnce sync.Once

	// mu guards exit.
	mu sync.Mutex
	// exit is set once before done is closed. Guarded by mu.
	exit Exit
}

func newProcess(pid int, cmd *exec.Cmd) *Process {
	return &Process{pid: pid, cmd: cmd, identity: Identity{Pid: pid}, done: make(chan struct{})}
}

func (p *Process) finish(e Exit) {
	p.mu.Lock()
	p.exit = e
	p.mu.Unlock()
	close(p.done)
	if p.cmd != nil {
		// Release the pidfd and exec's copy goroutines whether or not
		// anyone calls Wait; off the SIGCHLD loop, since exec's copies
		// may wait on a pipe a grandchild still holds.
		go p.join()
	}
}

// Pid returns the process id.
func (p *Process) Pid() int { return p.pid }

// Identity returns the pid and start time read when the process was started
// or claimed (StartTime is 0 if it had already exited).
func (p *Process) Identity() Identity { return p.identity }

// Done is closed once the process has been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit returns the exit once the process has been reaped.
func (p *Process) Exit() (Exit, bool) {
	select {
	case <-p.done:
	default:
		return Exit{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit, true
}

// Wait blocks until the process is reaped or ctx is done. Many callers may
// wait at once and each gets the same exit.
func (p *Process) Wait(ctx context.Context) (Exit, error) {
	select {
	case <-p.done:
	case <-ctx.Done():
		return Exit{}, fmt.Errorf("wait for pid %d: %w", p.pid, ctx.Err())
	}
	p.join()
	e, _ := p.Exit()
	return e, nil
}

// join lets exec finish copying the process's stdio and releases its pidfd.
// It runs only after the loop reaped the process (finish starts it), so
// Cmd.Wait cannot steal the exit: the kernel answers ECHILD, which is
// expected and ignored.
func (p *Process) join() {
	if p.cmd == nil {
		return
	}
	p.joinOnce.Do(func() {
		_ = p.cmd.Wait()
		_ = p.cmd.Process.Release()
	})
}

// Signal sends sig to the process. It returns errdefs.ErrNotFound once the
// process has been reaped. A started process is signalled through its pidfd,
// so a reused pid is never hit; a claimed one is checked against its start
// time first.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return fmt.Errorf("pid %d: %w", p.pid, errdefs.ErrNotFound)
	default:
	}
	if p.cmd != nil {
		err := p.cmd.Process.Signal(sig)
		if errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("pid %d: %w", p.pid, errdefs.ErrNotFound)
		}
		return err
	}
	if p.identity.StartTime != 0 {
		return p.identity.Signal(sig)
	}
	if err := unix.Kill(p.pid, sig); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pid %d: %w", p.pid, errdefs.ErrNotFound)
		}
		return os.NewSyscallError("kill", err)
	}
	return nil
}
