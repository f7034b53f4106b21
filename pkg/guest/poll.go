package guest

import (
	"context"
	"time"
)

// longPoll bounds one long-poll request (ReadStdio, WaitProcess, Events):
// the caller re-checks its state after every change until the wait is spent
// or ctx ends, and then answers with what there is.
type longPoll struct {
	ctx   context.Context
	wait  time.Duration
	timer *time.Timer
}

// newLongPoll starts a poll of wait, capped at maxWait.
func newLongPoll(ctx context.Context, wait time.Duration) *longPoll {
	return &longPoll{ctx: ctx, wait: min(wait, maxWait)}
}

// expired says the poll must answer now.
func (p *longPoll) expired() bool { return p.wait <= 0 }

// await blocks until changed is closed, the wait is spent, or ctx is done
// (the caller gave up or the agent stops).
func (p *longPoll) await(changed <-chan struct{}) {
	if p.timer == nil {
		p.timer = time.NewTimer(p.wait)
	}
	select {
	case <-changed:
	case <-p.timer.C:
		p.wait = 0
	case <-p.ctx.Done():
		p.wait = 0
	}
}

// stop releases the poll's timer.
func (p *longPoll) stop() {
	if p.timer != nil {
		p.timer.Stop()
	}
}
