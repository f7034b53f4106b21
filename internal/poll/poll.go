// Package poll waits, in tests, for what the code under test brings about
// asynchronously: it checks a condition again and again until it holds or
// a deadline passes, instead of sleeping for a guessed time.
package poll

import (
	"runtime"
	"testing"
	"time"
)

// Timeout bounds every wait of this package. It is generous because the
// machines that run the tests are slow and shared; a condition that holds
// ends the wait at once, however long the bound.
const Timeout = 30 * time.Second

// interval is the pause between two checks of a condition.
const interval = 2 * time.Millisecond

// Wait calls cond until it returns nil or Timeout has passed, and returns
// cond's last error: nil if the condition came to hold in time. A failed
// wait's error is from a call made after the deadline.
func Wait(cond func() error) error {
	deadline := time.Now().Add(Timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		runtime.Gosched()
		time.Sleep(interval)
	}
}

// Until fails the test at once (t.Fatalf), naming what it waited for and
// cond's last error, unless cond returns nil within Timeout.
func Until(t testing.TB, what string, cond func() error) {
	t.Helper()
	if err := Wait(cond); err != nil {
		t.Fatalf("%s: not within %v: %v", what, Timeout, err)
	}
}
