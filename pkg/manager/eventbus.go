package manager

import (
	"errors"
	"sync"

	"github.com/boxlite/boxlite/pkg/api"
)

// errSlowSubscriber ends the subscription of a reader that fell eventBuffer
// events behind.
var errSlowSubscriber = errors.New("events: the reader fell too far behind and was dropped")

// eventBus fans events out to subscribers without ever blocking the
// publisher: a subscriber whose buffer is full is dropped (its channel
// closed, its err set), as a slow HTTP client must not stall the shims.
type eventBus struct {
	mu     sync.Mutex
	subs   map[*subscriber]struct{}
	closed bool
}

// subscriber is one reader of the bus.
type subscriber struct {
	ch chan api.Event
	// dropped is set (under the bus's mu) when it was dropped for lagging.
	dropped bool
	bus     *eventBus
}

func newEventBus() *eventBus { return &eventBus{subs: map[*subscriber]struct{}{}} }

// subscribe adds a reader; unsubscribe it when done.
func (b *eventBus) subscribe() *subscriber {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := &subscriber{ch: make(chan api.Event, eventBuffer), bus: b}
	if b.closed {
		close(s.ch)
		return s
	}
	b.subs[s] = struct{}{}
	return s
}

// unsubscribe removes a reader (idempotent).
func (b *eventBus) unsubscribe(s *subscriber) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[s]; ok {
		delete(b.subs, s)
		close(s.ch)
	}
}

// publish hands ev to every subscriber that has room and drops the others.
func (b *eventBus) publish(ev api.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		select {
		case s.ch <- ev:
		default:
			s.dropped = true
			delete(b.subs, s)
			close(s.ch)
		}
	}
}

// close ends every subscription.
func (b *eventBus) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for s := range b.subs {
		delete(b.subs, s)
		close(s.ch)
	}
}

// err says why a subscription's channel closed: nil for an unsubscribe or
// the bus closing, errSlowSubscriber for a dropped reader.
func (s *subscriber) err() error {
	s.bus.mu.Lock()
	defer s.bus.mu.Unlock()
	if s.dropped {
		return errSlowSubscriber
	}
	return nil
}
