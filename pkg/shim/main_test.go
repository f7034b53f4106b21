package shim

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// testTimeout bounds every wait of these tests.
const testTimeout = 10 * time.Second

func TestMain(m *testing.M) {
	// The shim's one owner of wait, as in the shim binary: hooks and
	// binary:// loggers are started through it, and it reaps the orphans
	// they leave (it makes this process a child subreaper).
	reaper.Default()
	os.Exit(m.Run())
}

// requireRoot skips the test unless it may mount and make network
// namespaces and taps.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, network namespaces, taps): run as root")
	}
}

// testCtx returns a context that ends with the test or after d.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// checkLeaks fails the test if, within testTimeout of its end, it still has
// more goroutines or open descriptors than when this was called, or any
// child process (zombies included). Call it before the test starts
// anything.
func checkLeaks(t *testing.T) {
	t.Helper()
	// The netpoller's descriptors are made on first use: make them now.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Close()
	goroutines, fds := runtime.NumGoroutine(), countFDs(t)
	kidsBefore := reaper.Children(os.Getpid())
	t.Cleanup(func() {
		var problem string
		deadline := time.Now().Add(testTimeout)
		for {
			problem = ""
			if g := runtime.NumGoroutine(); g > goroutines {
				problem = fmt.Sprintf("%d goroutines, had %d", g, goroutines)
			} else if n := countFDs(t); n > fds {
				problem = fmt.Sprintf("%d open descriptors, had %d", n, fds)
			} else if kids := newChildren(kidsBefore); len(kids) > 0 {
				problem = fmt.Sprintf("child processes %v", kids)
			} else {
				return
			}
			if time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond) // polling with a deadline
		}
		buf := make([]byte, 1<<16)
		t.Errorf("leak: %s\n%s", problem, buf[:runtime.Stack(buf, true)])
	})
}

// newChildren lists this process's children that are not in before.
func newChildren(before []int) []int {
	var out []int
	for _, pid := range reaper.Children(os.Getpid()) {
		if !slices.Contains(before, pid) {
			out = append(out, pid)
		}
	}
	return out
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
