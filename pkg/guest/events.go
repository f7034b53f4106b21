package guest

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

const (
	// eventRingSize is how many events the guest keeps for the host.
	eventRingSize = 1024
	// maxEventsPerReply caps EventsResponse.events (agent.proto).
	maxEventsPerReply = 256
)

// eventRing is a bounded, numbered log of events. The first event has seq 1;
// when the ring is full the oldest event is dropped, and a reader asking for
// events after a dropped one is told it missed some.
type eventRing struct {
	// size bounds len(ring).
	size int

	// mu guards the fields below.
	mu sync.Mutex
	// ring holds the newest events in seq order. Guarded by mu.
	ring []*api.Event
	// last is the seq of the newest event, 0 before the first. Guarded by mu.
	last uint64
	// changed is closed and replaced when an event is added. Guarded by mu.
	changed chan struct{}
}

// newEventRing returns an empty ring keeping at most size events.
func newEventRing(size int) *eventRing {
	return &eventRing{size: size, changed: make(chan struct{})}
}

// add numbers e, appends it and wakes waiting readers. It returns e's seq.
func (r *eventRing) add(e *api.Event) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last++
	e.Seq = r.last
	if len(r.ring) == r.size {
		copy(r.ring, r.ring[1:])
		r.ring = r.ring[:len(r.ring)-1]
	}
	r.ring = append(r.ring, e)
	close(r.changed)
	r.changed = make(chan struct{})
	return e.Seq
}

// sinceLocked returns copies of up to max events with seq > after, and
// whether events after `after` were already dropped. The caller holds mu.
func (r *eventRing) sinceLocked(after uint64, max int) ([]*api.Event, bool) {
	if len(r.ring) == 0 {
		return nil, after < r.last
	}
	first := r.ring[0].Seq
	missed := after+1 < first
	i := 0
	if after >= first {
		i = int(after - first + 1)
	}
	end := min(len(r.ring), i+max)
	out := make([]*api.Event, 0, end-i)
	for _, e := range r.ring[i:end] {
		out = append(out, cloneEvent(e))
	}
	return out, missed
}

// Wait returns the events after `after` (at most maxEventsPerReply), waiting up
// to wait (capped at maxWait), or until ctx is done, for one when there is
// none yet. An `after` beyond the newest event is invalid: it comes from
// another boot.
func (r *eventRing) Wait(ctx context.Context, after uint64, wait time.Duration) ([]*api.Event, bool, error) {
	poll := newLongPoll(ctx, wait)
	defer poll.stop()
	for {
		r.mu.Lock()
		if after > r.last {
			last := r.last
			r.mu.Unlock()
			return nil, false, fmt.Errorf("event %d is beyond the newest event %d: %w", after, last, errdefs.ErrInvalidArgument)
		}
		evs, missed := r.sinceLocked(after, maxEventsPerReply)
		changed := r.changed
		r.mu.Unlock()
		if len(evs) > 0 || missed || poll.expired() {
			return evs, missed, nil
		}
		poll.await(changed)
	}
}

// cloneEvent copies an event so a reply never aliases the ring.
func cloneEvent(e *api.Event) *api.Event {
	return &api.Event{
		Seq:        e.Seq,
		Kind:       e.Kind,
		Id:         e.Id,
		ExecId:     e.ExecId,
		Pid:        e.Pid,
		ExitStatus: e.ExitStatus,
		TimeUnixNs: e.TimeUnixNs,
	}
}
