package guest

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// addEvents adds n EXIT events with pids 1..n.
func addEvents(r *eventRing, n int) {
	for i := 1; i <= n; i++ {
		r.add(&api.Event{Kind: api.EventKind_EXIT, Pid: uint32(i)})
	}
}

func TestEventsRing(t *testing.T) {
	tests := []struct {
		name      string
		size, add int
		after     uint64
		wantFirst uint64 // seq of the first event returned, 0 for none
		wantN     int
		missed    bool
	}{
		{"empty ring has nothing", 4, 0, 0, 0, 0, false},
		{"all events in order", 4, 3, 0, 1, 3, false},
		{"events after a seq", 4, 3, 1, 2, 2, false},
		{"caught up", 4, 3, 3, 0, 0, false},
		{"oldest dropped: missed", 4, 10, 0, 7, 4, true},
		{"after the newest dropped one: missed", 4, 10, 5, 7, 4, true},
		{"after the last dropped one: not missed", 4, 10, 6, 7, 4, false},
		{"reply bounded", 1024, 600, 0, 1, maxEventsPerReply, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newEventRing(tt.size)
			addEvents(r, tt.add)
			evs, missed, err := r.Wait(context.Background(), tt.after, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(evs) != tt.wantN || missed != tt.missed {
				t.Fatalf("got %d events missed=%v, want %d missed=%v", len(evs), missed, tt.wantN, tt.missed)
			}
			for i, e := range evs {
				if want := tt.wantFirst + uint64(i); e.Seq != want || e.Pid != uint32(want) {
					t.Fatalf("event %d: seq %d pid %d, want seq %d", i, e.Seq, e.Pid, want)
				}
			}
		})
	}
}

func TestEventsAfterNewestIsRejected(t *testing.T) {
	r := newEventRing(4)
	addEvents(r, 2)
	if _, _, err := r.Wait(context.Background(), 3, 0); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("err = %v, want invalid argument", err)
	}
}

func TestEventsWaitWakesOnNewEvent(t *testing.T) {
	r := newEventRing(4)
	addEvents(r, 1)
	got := make(chan []*api.Event, 1)
	go func() {
		evs, _, _ := r.Wait(context.Background(), 1, testTimeout)
		got <- evs
	}()
	r.add(&api.Event{Kind: api.EventKind_OOM, Id: "c"})
	select {
	case evs := <-got:
		if len(evs) != 1 || evs[0].Seq != 2 || evs[0].Kind != api.EventKind_OOM {
			t.Fatalf("got %v, want the OOM event with seq 2", evs)
		}
	case <-time.After(testTimeout):
		t.Fatal("wait not woken by a new event")
	}
}

func TestEventsReplyDoesNotAliasTheRing(t *testing.T) {
	r := newEventRing(4)
	addEvents(r, 1)
	evs, _, _ := r.Wait(context.Background(), 0, 0)
	evs[0].Pid = 99
	again, _, _ := r.Wait(context.Background(), 0, 0)
	if again[0].Pid != 1 {
		t.Fatal("a reply shares memory with the ring")
	}
}
