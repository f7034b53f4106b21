// Package leakcheck fails a test that leaves behind what it started:
// goroutines, open file descriptors, child processes.
//
// Each check notes the process's state when it is called and registers a
// t.Cleanup that polls, within poll.Timeout, until the process is back to
// that state, and fails the test (t.Errorf) if it is not. Call the checks
// first in a test, before it starts anything, so that their cleanups run
// after the test's own. They look at the whole process, so they mean
// nothing in a test that runs in parallel with others.
package leakcheck

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// FDs fails the test if, when it ends, more file descriptors are open than
// when FDs was called. The runtime's netpoller, whose descriptors are made
// on first use and kept, is started first so that they are not counted.
func FDs(t testing.TB) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Close()
	before := openFDs(t)
	t.Cleanup(func() {
		var now map[int]string
		err := poll.Wait(func() error {
			if now = openFDs(t); len(now) > len(before) {
				return fmt.Errorf("%d descriptors open", len(now))
			}
			return nil
		})
		if err != nil {
			t.Errorf("leak: %d descriptors open, %d before the test; new: %s", len(now), len(before), newFDs(before, now))
		}
	})
}

// openFDs returns this process's open descriptors and what each refers to.
func openFDs(t testing.TB) map[int]string {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("list open descriptors: %v", err)
	}
	fds := make(map[int]string, len(entries))
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		// The descriptor ReadDir read through is closed by now: "" then.
		fds[fd], _ = os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
	}
	return fds
}

// newFDs describes the descriptors of now that are not in before, or that
// refer to something else now.
func newFDs(before, now map[int]string) string {
	var out []string
	for _, fd := range slices.Sorted(maps.Keys(now)) {
		if target, ok := before[fd]; !ok || target != now[fd] {
			out = append(out, fmt.Sprintf("%d=%s", fd, now[fd]))
		}
	}
	return fmt.Sprint(out)
}

// Goroutines fails the test if, when it ends, more goroutines run than when
// Goroutines was called; the failure shows every goroutine's stack.
func Goroutines(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		var now int
		err := poll.Wait(func() error {
			if now = runtime.NumGoroutine(); now > before {
				return fmt.Errorf("%d goroutines", now)
			}
			return nil
		})
		if err != nil {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("leak: %d goroutines, %d before the test\n%s", now, before, buf)
		}
	})
}

// Children fails the test if, when it ends, this process has any child
// process, zombies included: whatever the test started must have exited
// and been reaped, and so must any orphan reparented to this process (a
// child subreaper).
func Children(t testing.TB) {
	t.Helper()
	t.Cleanup(func() {
		var kids []int
		err := poll.Wait(func() error {
			if kids = reaper.Children(os.Getpid()); len(kids) > 0 {
				return fmt.Errorf("child processes %v", kids)
			}
			return nil
		})
		if err != nil {
			t.Errorf("leak: child processes %v", describe(kids))
		}
	})
}

// describe gives the name, state and parent of each of pids, as /proc
// shows them.
func describe(pids []int) []string {
	var out []string
	for _, pid := range pids {
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		var fields []string
		for line := range strings.Lines(string(status)) {
			if k, _, _ := strings.Cut(line, ":"); k == "Name" || k == "State" || k == "PPid" {
				fields = append(fields, strings.Join(strings.Fields(line), " "))
			}
		}
		out = append(out, fmt.Sprintf("%d (%s)", pid, strings.Join(fields, ", ")))
	}
	return out
}
