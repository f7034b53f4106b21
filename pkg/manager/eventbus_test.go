package manager

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
)

// busDeadline bounds what must not block.
const busDeadline = 10 * time.Second

func testEvent(i int) api.Event {
	return api.Event{Topic: "/tasks/exit", ID: fmt.Sprint(i), Exited: true, ExitStatus: uint32(i)}
}

func TestASubscriberThatNeverReadsIsDroppedAndOthersGetEveryEvent(t *testing.T) {
	b := newEventBus()
	defer b.close()
	stalled := b.subscribe()
	reader := b.subscribe()
	// The reader keeps up (it takes each event once published); the
	// stalled subscriber reads nothing.
	for i := range 2 * eventBuffer {
		b.publish(testEvent(i))
		select {
		case ev, ok := <-reader.ch:
			if !ok || ev != testEvent(i) {
				t.Fatalf("reader got %+v (open %v), want %+v", ev, ok, testEvent(i))
			}
		default:
			t.Fatalf("event %d did not reach the reader", i)
		}
	}
	if err := reader.err(); err != nil {
		t.Errorf("reader: %v", err)
	}

	// The stalled subscriber holds the first eventBuffer events, then its
	// channel is closed and its error says why.
	count := 0
	for ev := range stalled.ch {
		if ev != testEvent(count) {
			t.Fatalf("stalled event %d is %+v", count, ev)
		}
		count++
	}
	if count != eventBuffer {
		t.Errorf("the stalled subscriber got %d events, want the %d its buffer holds", count, eventBuffer)
	}
	if err := stalled.err(); !errors.Is(err, errSlowSubscriber) {
		t.Errorf("stalled subscriber's err %v, want errSlowSubscriber", err)
	}
	// Unsubscribing a dropped subscriber is harmless.
	b.unsubscribe(stalled)
}

func TestPublishNeverBlocks(t *testing.T) {
	b := newEventBus()
	stalled := b.subscribe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 10 * eventBuffer {
			b.publish(testEvent(i))
		}
	}()
	select {
	case <-done:
	case <-time.After(busDeadline):
		// Nothing that takes the bus's lock: the publisher holds it.
		t.Fatalf("publish blocked on a subscriber that never reads")
	}
	if err := stalled.err(); !errors.Is(err, errSlowSubscriber) {
		t.Errorf("err %v, want errSlowSubscriber", err)
	}
	b.unsubscribe(stalled)
	b.close()
}

func TestUnsubscribeIsIdempotent(t *testing.T) {
	b := newEventBus()
	defer b.close()
	s := b.subscribe()
	b.unsubscribe(s)
	b.unsubscribe(s) // must not close the channel twice
	if _, ok := <-s.ch; ok {
		t.Fatal("channel open after unsubscribe")
	}
	if err := s.err(); err != nil {
		t.Errorf("err after unsubscribe: %v, want nil", err)
	}
	// It gets nothing more, and publishing still works.
	other := b.subscribe()
	defer b.unsubscribe(other)
	b.publish(testEvent(1))
	if ev := <-other.ch; ev != testEvent(1) {
		t.Errorf("other subscriber got %+v", ev)
	}
}

func TestCloseEndsEverySubscription(t *testing.T) {
	b := newEventBus()
	subs := []*subscriber{b.subscribe(), b.subscribe(), b.subscribe()}
	b.publish(testEvent(7))
	b.close()
	for i, s := range subs {
		if ev, ok := <-s.ch; !ok || ev != testEvent(7) {
			t.Errorf("subscriber %d: first receive %+v, %v: want the event published before close", i, ev, ok)
		}
		if _, ok := <-s.ch; ok {
			t.Errorf("subscriber %d: channel open after close", i)
		}
		if err := s.err(); err != nil {
			t.Errorf("subscriber %d: err %v after close, want nil", i, err)
		}
		b.unsubscribe(s) // harmless after close
	}
	// Subscribing to a closed bus gives a closed channel, not a hang.
	late := b.subscribe()
	if _, ok := <-late.ch; ok {
		t.Error("subscription to a closed bus is open")
	}
	b.publish(testEvent(8)) // harmless after close
	b.close()               // and so is a second close
}
