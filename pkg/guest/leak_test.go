package guest

import (
	"os"
	"runtime"
	"testing"
	"time"
)

// checkLeaks fails the test if it leaves goroutines or file descriptors
// behind: every stream, pipe and connection it opened must be closed.
func checkLeaks(t *testing.T) {
	t.Helper()
	goroutines, fds := runtime.NumGoroutine(), countFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(testTimeout)
		for {
			g, f := runtime.NumGoroutine(), countFDs(t)
			if g <= goroutines && f <= fds {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("leak: %d goroutines (was %d), %d fds (was %d)", g, goroutines, f, fds)
			}
			runtime.Gosched()
			time.Sleep(time.Millisecond)
		}
	})
}

func countFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
