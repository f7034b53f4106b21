package health

import (
	"context"
	"sync"
	"time"
)

// Status is a box's health.
type Status string

// The health states: a box starts in Starting, becomes Healthy on its first
// successful probe, and Unhealthy after Retries failures in a row (failures
// within the start period do not count). Any success makes it Healthy again.
const (
	Starting  Status = "starting"
	Healthy   Status = "healthy"
	Unhealthy Status = "unhealthy"
	// Disabled is the status of a box whose check is turned off.
	Disabled Status = "disabled"
)

// Topic is the event topic health transitions are published on.
const Topic = "/tasks/health"

// Probe checks a box once. It must return by ctx's deadline.
type Probe func(ctx context.Context) error

// State is a box's health and its last probe.
type State struct {
	Status Status `json:"status"`
	// FailingStreak counts the probes that failed in a row.
	FailingStreak int `json:"failing_streak"`
	// LastError is the last failed probe's error, empty after a success.
	LastError string `json:"last_error,omitempty"`
	// At is when the state was last changed by a probe.
	At time.Time `json:"at"`
}

// machine is the state machine, separate from time and goroutines so it
// can be tested step by step.
type machine struct {
	opts    Options
	started time.Time
	state   State
}

// observe records one probe result at now and reports whether the status
// changed.
func (m *machine) observe(err error, now time.Time) bool {
	old := m.state.Status
	m.state.At = now
	if err == nil {
		m.state.Status, m.state.FailingStreak, m.state.LastError = Healthy, 0, ""
		return old != Healthy
	}
	m.state.LastError = err.Error()
	if now.Sub(m.started) < m.opts.StartPeriod && old == Starting {
		// Still starting: the failure does not count.
		return false
	}
	m.state.FailingStreak++
	if m.state.FailingStreak >= m.opts.Retries {
		m.state.Status = Unhealthy
	}
	return old != m.state.Status
}

// Checker probes a box periodically and reports each change of its status.
// It owns nothing else: it never stops or kills the box, so a box's exit is
// reported and reaped whether or not it is checked.
type Checker struct {
	opts   Options
	probe  Probe
	notify func(State)

	mu sync.Mutex
	// m is the state machine. Guarded by mu.
	m machine
}

// NewChecker returns a checker for a box that started at started. notify is
// called, from the checker's goroutine, after each status change (not for
// the initial Starting state).
func NewChecker(o Options, started time.Time, probe Probe, notify func(State)) *Checker {
	return &Checker{opts: o, probe: probe, notify: notify,
		m: machine{opts: o, started: started, state: State{Status: Starting, At: started}}}
}

// State returns the current health.
func (c *Checker) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m.state
}

// Run probes every Interval (from the end of one probe to the start of the
// next; the first after one Interval) until ctx is done. A disabled checker
// returns at once.
func (c *Checker) Run(ctx context.Context) {
	if c.opts.Disabled {
		return
	}
	t := time.NewTimer(c.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
		err := c.probe(pctx)
		cancel()
		if ctx.Err() != nil {
			// Stopped during the probe: its result means nothing.
			return
		}
		c.mu.Lock()
		changed := c.m.observe(err, time.Now())
		st := c.m.state
		c.mu.Unlock()
		if changed {
			c.notify(st)
		}
		t.Reset(c.opts.Interval)
	}
}
