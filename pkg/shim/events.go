package shim

import (
	"context"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/health"
	healthapi "github.com/boxlite/boxlite/pkg/health/api"
)

// publisher sends events to containerd one at a time, in the order they were
// queued. The queue is unbounded, so send never blocks (it is called under
// locks) and never drops; a containerd that stops taking events only makes
// the queue grow until close gives up.
//
// An event containerd does not take (it is restarting) is tried again, in
// order, for about 15 s (publishRetryDelays), as long as runc's shim keeps
// trying. Once an event has been given up on, the next ones get one try
// each until one goes through: containerd is gone, or the manager has no
// listener, and holding every later event for 15 s would help no one.
type publisher struct {
	// ns is the namespace events are published in.
	ns  string
	pub shim.Publisher
	// wake has a token when the queue may be non-empty or closed.
	wake chan struct{}
	done chan struct{}
	// closing is closed by close: no more waiting to try again.
	closing chan struct{}

	// mu guards queue and closed.
	mu sync.Mutex
	// queue holds the events not yet published, oldest first. Guarded by mu.
	queue []any
	// closed says close was called. Guarded by mu.
	closed bool
	// failing says the last event was given up on; touched only by run.
	failing bool
}

// publishRetryDelays are the pauses before each new try of an event that
// could not be published: about 15 s in all. A variable for tests.
var publishRetryDelays = []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}

func newPublisher(ns string, pub shim.Publisher) *publisher {
	p := &publisher{ns: ns, pub: pub, wake: make(chan struct{}, 1), done: make(chan struct{}), closing: make(chan struct{})}
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
		p.publish(topicOf(evt), evt)
	}
}

// publish sends one event, trying again while containerd is away (see
// publisher). Each try has a context of its own, cancelled once it
// returned: containerd's publisher queues a failed event for retries of its
// own with that context, which must fail at once, or the event could
// arrive twice, or after later ones.
func (p *publisher) publish(topic string, evt any) {
	for try := 0; ; try++ {
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), p.ns), 10*time.Second)
		err := p.pub.Publish(ctx, topic, evt)
		cancel()
		if err == nil {
			p.failing = false
			return
		}
		if p.failing || try == len(publishRetryDelays) {
			log.L.WithError(err).WithField("topic", topic).WithField("tries", try+1).Warn("publish event: dropped")
			p.failing = true
			return
		}
		if try == 0 {
			log.L.WithError(err).WithField("topic", topic).Info("publish event: trying again")
		}
		t := time.NewTimer(publishRetryDelays[try])
		select {
		case <-t.C:
		case <-p.closing:
			// The shim is ending: this event was tried, what is left
			// gets one try each.
			t.Stop()
			log.L.WithError(err).WithField("topic", topic).WithField("tries", try+1).Warn("publish event: dropped at shutdown")
			p.failing = true
			return
		}
	}
}

// close flushes queued events and closes the publisher, bounded.
func (p *publisher) close() {
	p.mu.Lock()
	if !p.closed {
		close(p.closing)
	}
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
