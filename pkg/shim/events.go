package shim

import (
	"context"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/health"
	healthapi "github.com/boxlite/boxlite/pkg/health/api"
)

// exitStatusVMDied is every task's status when the VM dies under it.
const exitStatusVMDied = 137

// publisher sends events to containerd one at a time, in the order they were
// queued. The queue is unbounded, so send never blocks (it is called under
// locks) and never drops; a containerd that stops taking events only makes
// the queue grow until close gives up.
type publisher struct {
	// ns is the namespace events are published in.
	ns  string
	pub shim.Publisher
	// wake has a token when the queue may be non-empty or closed.
	wake chan struct{}
	done chan struct{}

	// mu guards queue and closed.
	mu sync.Mutex
	// queue holds the events not yet published, oldest first. Guarded by mu.
	queue []any
	// closed says close was called. Guarded by mu.
	closed bool
}

func newPublisher(ns string, pub shim.Publisher) *publisher {
	p := &publisher{ns: ns, pub: pub, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go p.run()
	return p
}

// send queues an event. It never blocks.
func (p *publisher) send(evt any) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		log.L.WithField("topic", topicOf(evt)).Warn("event sent after the publisher closed: dropped")
		return
	}
	p.queue = append(p.queue, evt)
	p.mu.Unlock()
	p.signal()
}

func (p *publisher) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// next waits for the oldest queued event; ok is false once the queue is
// empty and closed.
func (p *publisher) next() (evt any, ok bool) {
	for {
		p.mu.Lock()
		if len(p.queue) > 0 {
			evt, p.queue[0] = p.queue[0], nil
			p.queue = p.queue[1:]
			p.mu.Unlock()
			return evt, true
		}
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return nil, false
		}
		<-p.wake
	}
}

func (p *publisher) run() {
	defer close(p.done)
	for {
		evt, ok := p.next()
		if !ok {
			return
		}
		topic := topicOf(evt)
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), p.ns), 10*time.Second)
		if err := p.pub.Publish(ctx, topic, evt); err != nil {
			log.L.WithError(err).WithField("topic", topic).Warn("publish event")
		}
		cancel()
	}
}

// close flushes queued events and closes the publisher, bounded.
func (p *publisher) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.signal()
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
	}
	p.pub.Close()
}

func topicOf(evt any) string {
	switch evt.(type) {
	case *eventstypes.TaskCreate:
		return runtime.TaskCreateEventTopic
	case *eventstypes.TaskStart:
		return runtime.TaskStartEventTopic
	case *eventstypes.TaskOOM:
		return runtime.TaskOOMEventTopic
	case *eventstypes.TaskExit:
		return runtime.TaskExitEventTopic
	case *eventstypes.TaskDelete:
		return runtime.TaskDeleteEventTopic
	case *eventstypes.TaskExecAdded:
		return runtime.TaskExecAddedEventTopic
	case *eventstypes.TaskExecStarted:
		return runtime.TaskExecStartedEventTopic
	case *eventstypes.TaskPaused:
		return runtime.TaskPausedEventTopic
	case *eventstypes.TaskResumed:
		return runtime.TaskResumedEventTopic
	case *healthapi.TaskHealth:
		return health.Topic
	}
	return runtime.TaskUnknownTopic
}

// watchGuest turns the guest's events into task events: OOM as it comes
// (the guest orders it before the matching exit), exits once the process's
// output is drained. When the VM dies, every process that has not exited
// exits with 137. It returns when the VM is gone.
func (s *service) watchGuest(b *box) {
	c := b.sb.Agent()
	var after uint64
	for {
		select {
		case <-b.sb.Done():
			s.vmDied(b)
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, err := c.Events(ctx, &api.EventsRequest{After: after, WaitMs: 10000})
		cancel()
		if err != nil {
			select {
			case <-b.sb.Done():
			case <-c.Done():
				// The agent connection is gone; the VM follows (sandbox
				// kills a guest that broke the protocol).
				<-b.sb.Done()
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		if resp.Missed {
			log.L.WithField("id", b.id).Warn("guest events were missed: resynchronising")
			s.resync(b)
		}
		for _, e := range resp.Events {
			after = e.Seq
			s.guestEvent(b, e)
		}
	}
}

// guestEvent handles one event from the guest.
func (s *service) guestEvent(b *box, e *api.Event) {
	switch e.Kind {
	case api.EventKind_OOM:
		s.events.send(&eventstypes.TaskOOM{ContainerID: b.id})
	case api.EventKind_EXIT:
		p, err := b.process(e.ExecId)
		if err != nil || e.Id != b.id {
			return
		}
		go s.finishExit(b, p, exitInfo{status: e.ExitStatus, at: time.Unix(0, e.TimeUnixNs)})
	}
}

// resync asks the guest for the exit of every process still running.
func (s *service) resync(b *box) {
	for _, p := range b.processes() {
		if st, _ := p.current(); st != stateRunning && st != statePaused {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := b.sb.Agent().WaitProcess(ctx, &api.WaitProcessRequest{Id: p.id, ExecId: p.execID})
		cancel()
		if err == nil && resp.Exited {
			if resp.OomKilled {
				s.events.send(&eventstypes.TaskOOM{ContainerID: b.id})
			}
			go s.finishExit(b, p, exitInfo{status: resp.ExitStatus, at: time.Unix(0, resp.ExitedAtUnixNs)})
		}
	}
}

// finishExit drains the process's output, records the exit and publishes
// TaskExit after the process's start event.
func (s *service) finishExit(b *box, p *process, e exitInfo) {
	if st, _ := p.current(); st == stateCreated {
		// Killed before it was started: there is no start event to
		// wait for (a Start that comes now fails on the exited process).
		p.markStarted()
	}
	<-p.started
	if r := p.getRelay(); r != nil {
		r.drain()
		// containerd's readers see EOF now, as with the runc shim,
		// rather than at Delete.
		r.closeOutputs()
	}
	if !p.setExited(e) {
		return
	}
	if p == b.init {
		b.stopHealth()
	}
	s.events.send(&eventstypes.TaskExit{
		ContainerID: b.id, ID: p.execIDOrID(), Pid: b.vmmPid(),
		ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at),
	})
}

// vmDied records exit 137 for every process of a box whose VM is gone,
// after a TaskOOM when the host's OOM killer killed the VMM (kata #4419: a
// VMM killed for memory must not read as an ordinary exit).
func (s *service) vmDied(b *box) {
	b.stopHealth()
	now := time.Now()
	if b.sb.VM().OOMKilled() {
		log.L.WithField("id", b.id).Warn("the host's OOM killer killed the vmm")
		s.events.send(&eventstypes.TaskOOM{ContainerID: b.id})
	}
	for _, p := range b.processes() {
		st, _ := p.current()
		if st == stateCreated {
			// Never started: it cannot run any more; Start will fail.
			p.markStarted()
		}
		if r := p.getRelay(); r != nil {
			r.close()
		}
		go s.finishExit(b, p, exitInfo{status: exitStatusVMDied, at: now})
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
