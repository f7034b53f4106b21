package shim

import (
	"context"

	"github.com/containerd/log"
)

// cleanups is an undo stack for a Create that fails halfway: each step
// that made something adds how to undo it, and run undoes them in reverse
// order, logging what could not be undone.
type cleanups struct {
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func(context.Context) error
}

// add pushes an undo step.
func (u *cleanups) add(what string, fn func(context.Context) error) {
	u.steps = append(u.steps, cleanupStep{what: what, fn: fn})
}

// run undoes every step, newest first.
func (u *cleanups) run(ctx context.Context, id string) {
	for i := len(u.steps) - 1; i >= 0; i-- {
		st := u.steps[i]
		if err := st.fn(ctx); err != nil {
			log.G(ctx).WithError(err).WithField("id", id).Errorf("clean up failed create: %s", st.what)
		}
	}
	u.steps = nil
}
