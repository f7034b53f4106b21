package shim

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
)

// procState is where a process (a box's init or an exec) is in its life.
type procState int

const (
	stateCreated procState = iota
	stateRunning
	statePaused
	stateStopped
	stateDeleted
)

func (s procState) String() string {
	return [...]string{"created", "running", "paused", "stopped", "deleted"}[s]
}

// taskStatus is the Task API's view of a state.
func (s procState) taskStatus() task.Status {
	switch s {
	case stateCreated:
		return task.Status_CREATED
	case stateRunning:
		return task.Status_RUNNING
	case statePaused:
		return task.Status_PAUSED
	default:
		return task.Status_STOPPED
	}
}

// exitInfo is how a process ended.
type exitInfo struct {
	status uint32
	at     time.Time
}

// process is one process of a container: its init (execID "") or an exec.
//
// Its lifecycle follows runc's shim: an operation checks the state, does
// its work, and only then changes the state (transition), all under op, so
// a Start or Delete whose work failed leaves the state as it was and can be
// retried or followed by a Delete.
type process struct {
	id, execID string
	// op serialises the lifecycle operations (Start, Delete, Pause,
	// Resume) of this process; Kill and Wait do not take it.
	op sync.Mutex
	// stdio is what containerd asked for.
	stdio stdioConfig
	// spec is the exec's OCI process as JSON (nil for init).
	spec []byte
	// started is closed once Start has published TaskStart or
	// TaskExecStarted (or failed): exits are published after it.
	started chan struct{}
	// exited is closed once the exit is recorded.
	exited chan struct{}

	// mu guards the fields below.
	mu sync.Mutex
	// state is guarded by mu.
	state procState
	// starting says a Start's work is in flight. Guarded by mu.
	starting bool
	// exit is set when state becomes stopped. Guarded by mu.
	exit exitInfo
	// relay moves stdio; nil until started. Guarded by mu.
	relay *relay
	// startOnce guards closing started.
	startOnce sync.Once
}

func newProcess(id, execID string, stdio stdioConfig, spec []byte) *process {
	return &process{id: id, execID: execID, stdio: stdio, spec: spec,
		started: make(chan struct{}), exited: make(chan struct{})}
}

// name is "id" or "id/exec" for errors and logs.
func (p *process) name() string {
	if p.execID == "" {
		return p.id
	}
	return p.id + "/" + p.execID
}

// require says why verb cannot run unless the process is in one of states.
// Call it with op held, before the work; transition after it. A deleted
// process is NotFound, as with runc's shim: containerd deletes a task from
// two places at once (a pod's rollback and its exit handler) and takes
// NotFound as "already deleted".
func (p *process) require(verb string, states ...procState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateDeleted {
		return fmt.Errorf("%s %s: already deleted: %w", verb, p.name(), errdefs.ErrNotFound)
	}
	for _, st := range states {
		if p.state == st {
			return nil
		}
	}
	return fmt.Errorf("cannot %s %s in %s state: %w", verb, p.name(), p.state, errdefs.ErrFailedPrecondition)
}

// transition moves the process from one of from to to, or says why not.
// An exit recorded meanwhile wins: a process that stopped while its Start
// or Resume was in flight stays stopped.
func (p *process) transition(verb string, to procState, from ...procState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateStopped && to != stateDeleted {
		return nil
	}
	for _, f := range from {
		if p.state == f {
			p.state = to
			return nil
		}
	}
	return fmt.Errorf("cannot %s %s in %s state: %w", verb, p.name(), p.state, errdefs.ErrFailedPrecondition)
}

// current returns the state and exit.
func (p *process) current() (procState, exitInfo) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state, p.exit
}

// setExited records the exit once; later calls are ignored. It reports
// whether this call recorded it. A deleted process records it and stays
// deleted.
func (p *process) setExited(e exitInfo) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.exited:
		return false
	default:
	}
	if p.state != stateDeleted {
		p.state = stateStopped
	}
	p.exit = e
	close(p.exited)
	return true
}

// beginStart notes that a Start's work is in flight: an exit that comes
// meanwhile waits for its TaskStart.
func (p *process) beginStart() {
	p.mu.Lock()
	p.starting = true
	p.mu.Unlock()
}

// endStart notes that the Start's work is over (done or failed) and
// releases exit publication.
func (p *process) endStart() {
	p.mu.Lock()
	p.starting = false
	p.mu.Unlock()
	p.markStarted()
}

// neverStarting says the process was created and no Start is in flight:
// an exit now has no start event to wait for.
func (p *process) neverStarting() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state == stateCreated && !p.starting
}

// readyToExit says the process's exit can be published at once: its start
// was published and it has no output to drain.
func (p *process) readyToExit() bool {
	select {
	case <-p.started:
	default:
		return false
	}
	return p.getRelay() == nil
}

// markStarted releases exit publication for this process.
func (p *process) markStarted() {
	p.startOnce.Do(func() { close(p.started) })
}

// wait blocks until the process exits or ctx is done.
func (p *process) wait(ctx context.Context) (exitInfo, error) {
	select {
	case <-p.exited:
	case <-ctx.Done():
		return exitInfo{}, ctx.Err()
	}
	_, e := p.current()
	return e, nil
}

// setRelay stores the process's stdio relay.
func (p *process) setRelay(r *relay) {
	p.mu.Lock()
	p.relay = r
	p.mu.Unlock()
}

// getRelay returns the process's stdio relay, or nil.
func (p *process) getRelay() *relay {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.relay
}
