package shim

import (
	"context"
	"errors"
	"strings"
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

// flakyPublisher refuses events while down (containerd restarting) and
// records, in order, the ones it took.
type flakyPublisher struct {
	mu    sync.Mutex
	down  int // tries to refuse before taking events again; <0: for ever
	tries int
	got   []string
}

func (p *flakyPublisher) Publish(ctx context.Context, topic string, evt events.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.tries++
	if p.down != 0 {
		if p.down > 0 {
			p.down--
		}
		return errors.New("connection refused")
	}
	p.got = append(p.got, evt.(*eventstypes.TaskExit).ID)
	return nil
}

func (p *flakyPublisher) Close() error { return nil }

// An event containerd refuses while it restarts is tried again, and
// nothing published meanwhile overtakes it. Verified two-sided: with one
// try per event (as before: publishRetryDelays empty), all three were lost.
func TestPublisherRetriesInOrderWhileContainerdIsAway(t *testing.T) {
	defer func(old []time.Duration) { publishRetryDelays = old }(publishRetryDelays)
	publishRetryDelays = []time.Duration{time.Millisecond, time.Millisecond, time.Millisecond, time.Millisecond}
	pub := &flakyPublisher{down: 3}
	p := newPublisher("ns", pub)
	for _, id := range []string{"a", "b", "c"} {
		p.send(&eventstypes.TaskExit{ID: id})
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		pub.mu.Lock()
		n := len(pub.got)
		pub.mu.Unlock()
		if n == 3 {
			break
		}
	}
	p.close()
	if got := strings.Join(pub.got, " "); got != "a b c" {
		t.Fatalf("published %q, want every event in order", got)
	}
}

// An event given up on does not hold every later one for the whole retry
// time: they get one try each until one goes through, and then retries
// resume.
func TestPublisherGivesUpOnceThenTriesEachEventOnce(t *testing.T) {
	defer func(old []time.Duration) { publishRetryDelays = old }(publishRetryDelays)
	publishRetryDelays = []time.Duration{time.Millisecond, time.Millisecond}
	pub := &flakyPublisher{down: -1}
	p := newPublisher("ns", pub)
	for _, id := range []string{"a", "b", "c"} {
		p.send(&eventstypes.TaskExit{ID: id})
	}
	waitFor := func(tries int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			pub.mu.Lock()
			n := pub.tries
			pub.mu.Unlock()
			if n >= tries {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d tries, want %d", n, tries)
			}
			time.Sleep(time.Millisecond)
		}
	}
	// a: 1 + 2 retries; b and c: one try each.
	waitFor(5)
	pub.mu.Lock()
	pub.down = 0
	pub.mu.Unlock()
	p.send(&eventstypes.TaskExit{ID: "d"})
	p.close()
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if pub.tries != 6 || strings.Join(pub.got, " ") != "d" {
		t.Fatalf("%d tries, published %q; want 6 tries and d alone", pub.tries, pub.got)
	}
}

// A shim that ends does not wait out the retries of an event nobody takes
// (the manager without a listener): close returns at once. Verified
// two-sided: with the retry wait not interrupted by close, close took the
// whole retry time.
func TestPublisherCloseCutsTheRetriesShort(t *testing.T) {
	defer func(old []time.Duration) { publishRetryDelays = old }(publishRetryDelays)
	publishRetryDelays = []time.Duration{time.Hour}
	pub := &flakyPublisher{down: -1}
	p := newPublisher("ns", pub)
	p.send(&eventstypes.TaskExit{ID: "a"})
	p.send(&eventstypes.TaskExit{ID: "b"})
	done := make(chan struct{})
	go func() { p.close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("close waited for the retries of an event nobody takes")
	}
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if pub.tries != 2 {
		t.Errorf("%d tries, want one each for a and b", pub.tries)
	}
}
