package guest

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// exitRecord is how a process ended.
type exitRecord struct {
	// status is the exit code, or 128+n when killed by signal n.
	status uint32
	// at is when the exit was reaped.
	at time.Time
	// oomKilled says the container's cgroup recorded an OOM kill while the
	// process ran.
	oomKilled bool
}

// process is one process of a container, its init or an exec, from the moment
// the runtime reported its pid until it is deleted. Its exit and its output
// stay available until then.
type process struct {
	// cid is the container id.
	cid string
	// execID is empty for the init process.
	execID string
	// pid is the process id in the guest.
	pid int
	// handle delivers the process's exit from the reaper.
	handle *reaper.Process
	// procStdio holds the process's stdin, stdout, stderr and terminal.
	procStdio
	// oomBase is the container's oom_kill count when the process started.
	oomBase uint64
	// exited is closed once exit is set.
	exited chan struct{}

	// mu guards exit.
	mu sync.Mutex
	// exit is set once, before exited is closed. Guarded by mu.
	exit exitRecord
}

// newProcess returns a process: handle delivers its exit, stdio is its
// agent-side stdio.
func newProcess(cid, execID string, handle *reaper.Process, stdio procStdio, oomBase uint64) *process {
	return &process{
		cid:       cid,
		execID:    execID,
		pid:       handle.Pid(),
		handle:    handle,
		procStdio: stdio,
		oomBase:   oomBase,
		exited:    make(chan struct{}),
	}
}

// setExit records the exit and wakes every waiter. It is called once.
func (p *process) setExit(e exitRecord) {
	p.mu.Lock()
	p.exit = e
	p.mu.Unlock()
	close(p.exited)
}

// exitInfo returns the exit once the process exited.
func (p *process) exitInfo() (exitRecord, bool) {
	select {
	case <-p.exited:
	default:
		return exitRecord{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit, true
}

// hasExited reports whether the exit was recorded.
func (p *process) hasExited() bool {
	_, ok := p.exitInfo()
	return ok
}

// wait waits up to wait (capped at maxWait) for the exit.
func (p *process) wait(ctx context.Context, wait time.Duration) *api.WaitProcessResponse {
	if poll := newLongPoll(ctx, wait); !poll.expired() {
		poll.await(p.exited)
		poll.stop()
	}
	e, ok := p.exitInfo()
	if !ok {
		return &api.WaitProcessResponse{}
	}
	return &api.WaitProcessResponse{
		Exited:         true,
		ExitStatus:     e.status,
		ExitedAtUnixNs: e.at.UnixNano(),
		OomKilled:      e.oomKilled,
	}
}

// stream returns the output stream asked for.
func (p *process) stream(s api.StdioStream) (*outStream, error) {
	switch s {
	case api.StdioStream_STDOUT:
		return p.stdout, nil
	case api.StdioStream_STDERR:
		return p.stderr, nil
	}
	return nil, fmt.Errorf("unknown stdio stream %d: %w", s, errdefs.ErrInvalidArgument)
}

// stdinStream returns the stdin stream, or ErrFailedPrecondition without one.
func (p *process) stdinStream() (*inStream, error) {
	if p.stdin == nil {
		return nil, fmt.Errorf("process %s has no stdin: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	return p.stdin, nil
}

// name names the process in errors and logs.
func (p *process) name() string {
	if p.execID == "" {
		return p.cid
	}
	return p.cid + "/" + p.execID
}

// release drops the process's stdio: pumps stop, pipes (and the terminal)
// close. The process must have exited or be known to be dying.
func (p *process) release() {
	if p.stdin != nil {
		p.stdin.discard()
	}
	_ = p.stdout.Close()
	_ = p.stderr.Close()
}
