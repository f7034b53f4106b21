package shim

import (
	"context"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/agent/api"
)

// exitStatusVMDied is every task's status when the VM dies under it.
const exitStatusVMDied = 137

// vmDeathConsoleLines is how much of the console the shim logs when the VM
// dies under running processes.
const vmDeathConsoleLines = 30

// exitLoopWait bounds teardown's wait for the exit loop to publish the last
// exits (each waits at most drainTimeout for its output).
const exitLoopWait = 30 * time.Second

// oomQuiet is the least time between two TaskOOM of one container: the
// guest's OOM news within it is folded into the TaskOOM already sent.
// Without it a guest could send OOM events as fast as the host polls (256
// a reply), each a TaskOOM to containerd, queued faster than containerd
// takes them: the shim's memory grew by about 7 MiB a second. A variable
// only so that tests can change it.
var oomQuiet = time.Second

// exitNote is news for the exit loop.
type exitNote struct {
	// c is the container the news is about (nil when the VM died).
	c *container
	// p is the process that exited; nil for an OOM alone.
	p *process
	// e is p's exit.
	e exitInfo
	// oom sends a TaskOOM for c now, before p's exit (if any).
	oom bool
	// vmDied says the VM is gone: every process whose exit is not known
	// exits with 137.
	vmDied bool
}

// exitReport is a known exit on its way to TaskExit.
type exitReport struct {
	c *container
	p *process
	e exitInfo
}

// exitLoop is a sandbox's one owner of exits. Fed, in order, by the guest's
// events, a resync after missed events and the VM's death, it records each
// process's exit and publishes TaskOOM and TaskExit:
//   - an exit known first wins: a real exit code is never replaced by the
//     VM-death 137, however late the VM dies;
//   - a TaskExit goes out after the process's TaskStart, once its output
//     is drained (bounded), so containerd's readers have it all;
//   - an init's TaskExit goes out after the TaskExit of every exec of its
//     container that was running (as runc's shim does);
//   - OOM goes out as it comes (the guest sends it before the exit), at
//     most one TaskOOM per container per oomQuiet.
//
// Draining runs in a goroutine per exit; only the loop decides and
// publishes, so nothing slow blocks it and nothing races it.
type exitLoop struct {
	pub *publisher
	// pid is the VMM's pid, the tasks' pid in events.
	pid uint32
	// oomKilled says the host's OOM killer took the VMM.
	oomKilled func() bool
	// containers lists the sandbox's containers.
	containers func() []*container
	// onInitExit runs on the loop before an init's TaskExit goes out.
	onInitExit func(c *container)

	notes    chan exitNote
	prepared chan exitReport
	// done is closed when the loop ended: the VM died and every exit was
	// published.
	done chan struct{}

	// Owned by run.
	known    map[*process]bool
	inFlight int
	held     map[*container]exitReport
	dead     bool
	// lastOOM is when each container's last TaskOOM was sent.
	lastOOM map[*container]time.Time
	// console returns the VM's last console lines (nil: none to log).
	console func(n int) []string
}

func newExitLoop(pub *publisher, pid uint32, oomKilled func() bool, containers func() []*container, onInitExit func(*container), console func(n int) []string) *exitLoop {
	l := &exitLoop{
		pub: pub, pid: pid, oomKilled: oomKilled, containers: containers, onInitExit: onInitExit, console: console,
		notes: make(chan exitNote), prepared: make(chan exitReport), done: make(chan struct{}),
		known: map[*process]bool{}, held: map[*container]exitReport{}, lastOOM: map[*container]time.Time{},
	}
	go l.run()
	return l
}

// note hands news to the loop; it returns at once once the loop ended.
func (l *exitLoop) note(n exitNote) {
	select {
	case l.notes <- n:
	case <-l.done:
	}
}

// wait blocks, bounded, until the loop ended.
func (l *exitLoop) wait() {
	t := time.NewTimer(exitLoopWait)
	defer t.Stop()
	select {
	case <-l.done:
	case <-t.C:
		log.L.Warn("exit loop still publishing after the VM stopped")
	}
}

func (l *exitLoop) run() {
	defer close(l.done)
	for !l.dead || l.inFlight > 0 || len(l.held) > 0 {
		select {
		case n := <-l.notes:
			l.handle(n)
		case r := <-l.prepared:
			l.inFlight--
			l.publish(r)
		}
	}
}

func (l *exitLoop) handle(n exitNote) {
	switch {
	case n.vmDied:
		l.vmDied()
	case n.oom:
		l.oom(n.c)
	}
	if n.p != nil {
		l.exited(n.c, n.p, n.e)
	}
}

// oom sends a TaskOOM for c, unless one went out less than oomQuiet ago:
// that one already precedes any exit still to come.
func (l *exitLoop) oom(c *container) {
	now := time.Now()
	if last, ok := l.lastOOM[c]; ok && now.Sub(last) < oomQuiet {
		return
	}
	// Only the last oomQuiet matters: a pod's shim outlives many
	// containers, which must not stay referenced here.
	for k, last := range l.lastOOM {
		if now.Sub(last) >= oomQuiet {
			delete(l.lastOOM, k)
		}
	}
	l.lastOOM[c] = now
	l.pub.send(&eventstypes.TaskOOM{ContainerID: c.id})
}

// exited starts preparing a process's exit, unless one is known already.
func (l *exitLoop) exited(c *container, p *process, e exitInfo) {
	if l.known[p] {
		return
	}
	l.known[p] = true
	r := exitReport{c: c, p: p, e: e}
	if p.readyToExit() {
		// Started, and no output to drain: decided here, in order.
		l.publish(r)
		return
	}
	l.inFlight++
	go func() { l.prepared <- l.prepare(r) }()
}

// live says a process has not stopped yet.
func live(p *process) bool {
	st, _ := p.current()
	return st != stateStopped && st != stateDeleted
}

// prepare waits for the process's start to be published (or to fail) and
// its output to drain, and returns the exit for the loop to publish.
func (l *exitLoop) prepare(r exitReport) exitReport {
	if r.p.neverStarting() {
		// Killed before it was started: there is no start event to
		// wait for (a Start that comes now fails on the exited process).
		r.p.markStarted()
	}
	<-r.p.started
	if rl := r.p.getRelay(); rl != nil {
		rl.drain()
		// containerd's readers see EOF now, as with the runc shim,
		// rather than at Delete.
		rl.closeOutputs()
	}
	return r
}

// publish records a prepared exit and sends TaskExit, holding an init's
// until its container's running execs have exited.
func (l *exitLoop) publish(r exitReport) {
	if r.p == r.c.init && execsRunning(r.c) {
		l.held[r.c] = r
		return
	}
	l.send(r)
	if r.p == r.c.init {
		return
	}
	if h, ok := l.held[r.c]; ok && !execsRunning(r.c) {
		delete(l.held, r.c)
		l.send(h)
	}
}

func (l *exitLoop) send(r exitReport) {
	if !r.p.setExited(r.e) {
		return
	}
	if st, _ := r.p.current(); st == stateDeleted {
		return // deleted while its output drained: no exit after the delete
	}
	if r.p == r.c.init && l.onInitExit != nil {
		l.onInitExit(r.c)
	}
	l.pub.send(&eventstypes.TaskExit{
		ContainerID: r.c.id, ID: r.p.execIDOrID(), Pid: l.pid,
		ExitStatus: r.e.status, ExitedAt: protobuf.ToTimestamp(r.e.at),
	})
}

// execsRunning says an exec of c is running or paused: its exit is still
// to be published.
func execsRunning(c *container) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.execs {
		if st, _ := p.current(); st == stateRunning || st == statePaused {
			return true
		}
	}
	return false
}

// vmDied gives every process whose exit is not known the VM-death 137,
// after a TaskOOM per live container when the host's OOM killer took the
// VMM (kata #4419: a VMM killed for memory must not read as an ordinary
// exit).
func (l *exitLoop) vmDied() {
	if l.dead {
		return
	}
	now := time.Now()
	oom := l.oomKilled != nil && l.oomKilled()
	if oom {
		log.L.Warn("the host's OOM killer killed the vmm")
	}
	died := 0
	for _, c := range l.containers() {
		if oom && c.init != nil && live(c.init) {
			l.pub.send(&eventstypes.TaskOOM{ContainerID: c.id})
		}
		for _, p := range c.processes() {
			if live(p) {
				died++
				l.exited(c, p, exitInfo{status: exitStatusVMDied, at: now})
			}
		}
	}
	if died > 0 && l.console != nil {
		// Not a stop: the guest panicked, or the VMM was killed. Its
		// console says which.
		lines := l.console(vmDeathConsoleLines)
		log.L.WithField("processes", died).WithField("console_lines", len(lines)).Warn("the VM died under running processes; the end of its console follows")
		for _, line := range lines {
			log.L.Warn("console: " + line)
		}
	}
	l.dead = true
}

// pollGuest feeds the loop with the guest's events until the VM is gone,
// then tells it so. find maps a guest container id to the container.
func (l *exitLoop) pollGuest(a *agent.Client, done <-chan struct{}, find func(id string) *container) {
	var after uint64
	for {
		select {
		case <-done:
			l.note(exitNote{vmDied: true})
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, err := a.Events(ctx, &api.EventsRequest{After: after, WaitMs: 10000})
		cancel()
		if err != nil {
			select {
			case <-done:
			case <-a.Done():
				// The agent connection is gone; the VM follows (the
				// sandbox kills a guest that broke the protocol).
				<-done
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		if resp.Missed {
			log.L.Warn("guest events were missed: resynchronising")
			l.resync(a)
		}
		for _, e := range resp.Events {
			after = e.Seq
			c := find(e.Id)
			if c == nil {
				continue
			}
			switch e.Kind {
			case api.EventKind_OOM:
				l.note(exitNote{c: c, oom: true})
			case api.EventKind_EXIT:
				if p, err := c.process(e.ExecId); err == nil {
					l.note(exitNote{c: c, p: p, e: exitInfo{status: e.ExitStatus, at: time.Unix(0, e.TimeUnixNs)}})
				}
			}
		}
	}
}

// resync asks the guest for the exit of every process still running.
func (l *exitLoop) resync(a *agent.Client) {
	for _, c := range l.containers() {
		for _, p := range c.processes() {
			if st, _ := p.current(); st != stateRunning && st != statePaused {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			resp, err := a.WaitProcess(ctx, &api.WaitProcessRequest{Id: p.id, ExecId: p.execID})
			cancel()
			if err == nil && resp.Exited {
				l.note(exitNote{c: c, p: p, oom: resp.OomKilled,
					e: exitInfo{status: resp.ExitStatus, at: time.Unix(0, resp.ExitedAtUnixNs)}})
			}
		}
	}
}

// execIDOrID is the process id containerd uses in events: the exec id, or
// the container id for init.
func (p *process) execIDOrID() string {
	if p.execID == "" {
		return p.id
	}
	return p.execID
}
