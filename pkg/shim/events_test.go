package shim

import (
	"context"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
)

// stuckPublisher blocks every Publish until released, like a containerd that
// stopped taking events, and records what it was given.
type stuckPublisher struct {
	release chan struct{}
	mu      sync.Mutex
	got     []string
}

func (p *stuckPublisher) Publish(ctx context.Context, topic string, evt events.Event) error {
	<-p.release
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, evt.(*eventstypes.TaskExit).ID)
	return nil
}

func (p *stuckPublisher) Close() error { return nil }

// send never blocks, however slow containerd is (it is called under locks),
// and every event still goes out, in order. Verified two-sided: with the old
// 128-slot channel the 129th send blocked and this test failed.
func TestPublisherSendNeverBlocksAndKeepsOrder(t *testing.T) {
	pub := &stuckPublisher{release: make(chan struct{})}
	p := newPublisher("ns", pub)
	const n = 1000
	sent := make(chan struct{})
	go func() {
		for i := range n {
			p.send(&eventstypes.TaskExit{ID: string(rune('a'+i%26)) + time.Duration(i).String()})
		}
		close(sent)
	}()
	select {
	case <-sent:
	case <-time.After(10 * time.Second):
		t.Fatal("send blocked while the publisher was stuck")
	}
	close(pub.release)
	p.close()
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if len(pub.got) != n {
		t.Fatalf("published %d of %d events", len(pub.got), n)
	}
	for i, id := range pub.got {
		if want := string(rune('a'+i%26)) + time.Duration(i).String(); id != want {
			t.Fatalf("event %d is %q, want %q", i, id, want)
		}
	}
}
