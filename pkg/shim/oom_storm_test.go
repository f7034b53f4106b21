package shim

import (
	"slices"
	"testing"
	"time"
)

// setOOMQuiet sets oomQuiet for one test, before its exit loop starts.
func setOOMQuiet(t *testing.T, d time.Duration) {
	t.Helper()
	old := oomQuiet
	oomQuiet = d
	t.Cleanup(func() { oomQuiet = old })
}

// A guest that reports OOMs as fast as it can (a hostile guest answers
// every Events poll with 256 of them) gets one TaskOOM per container per
// oomQuiet, still before the exit: not one per report, which the shim
// queued faster than containerd took them (about 4500 a second and 7 MiB
// of memory a second, measured with the hostile test guest).
//
// Verified two-sided: with handle sending a TaskOOM per OOM note (the code
// before oomQuiet) it fails, a TaskOOM going out for every note.
func TestOOMStormIsFoldedIntoOneTaskOOMPerContainer(t *testing.T) {
	checkLeaks(t)
	setOOMQuiet(t, time.Hour)
	c1, c2 := testContainer("c1"), testContainer("c2")
	l, rec := testLoop(t, c1, c2)
	for range 1000 {
		l.note(exitNote{c: c1, oom: true})
	}
	l.note(exitNote{c: c2, oom: true})
	l.note(exitNote{c: c1, oom: true})
	// The loop handles notes in order: once c1's exit is out, every OOM
	// note before it was handled.
	l.note(exitNote{c: c1, p: c1.init, e: exitInfo{status: 137, at: time.Now()}})
	rec.waitFor(t, 3)
	want := []string{"oom c1", "oom c2", "exit c1/c1 137"}
	if got := rec.events(); !slices.Equal(got, want) {
		t.Fatalf("published %d events %q; want %q", len(got), got[:min(len(got), 5)], want)
	}
}

// Folding lasts oomQuiet: an OOM after it is published again.
func TestOOMAfterTheQuietPeriodIsPublished(t *testing.T) {
	checkLeaks(t)
	setOOMQuiet(t, time.Millisecond)
	c1 := testContainer("c1")
	l, rec := testLoop(t, c1)
	deadline := time.Now().Add(testTimeout)
	for len(rec.events()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("events %q: no second TaskOOM after oomQuiet", rec.events())
		}
		l.note(exitNote{c: c1, oom: true})
		time.Sleep(2 * time.Millisecond)
	}
	if got := rec.events(); !slices.Equal(got[:2], []string{"oom c1", "oom c1"}) {
		t.Fatalf("events %q; want two TaskOOMs", got)
	}
}
