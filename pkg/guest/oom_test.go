package guest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// writeMemoryEvents writes a cgroup v2 memory.events with oomKills.
func writeMemoryEvents(t *testing.T, path string, oomKills int) {
	t.Helper()
	data := fmt.Sprintf("low 0\nhigh 0\nmax 3\noom 1\noom_kill %d\noom_group_kill 0\n", oomKills)
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// fakeContainer returns an agent and a container with an init process
// whose cgroup's memory.events is a file the test writes.
func fakeContainer(t *testing.T, oomKills int) (*Agent, *container, string) {
	t.Helper()
	a, err := New(Runtime{Name: "fake"}, nil, WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "memory.events")
	writeMemoryEvents(t, path, oomKills)
	c := &container{id: "c1", status: statusRunning, execs: map[string]*process{}, op: make(chan struct{}, 1)}
	c.oom = newOOMCounter(path, a.oomReporter(c.id, 42))
	c.init = fakeProcess(c, "", 42)
	return a, c, path
}

func fakeProcess(c *container, execID string, pid int) *process {
	return &process{
		cid: c.id, execID: execID, pid: pid,
		procStdio: procStdio{
			stdout: newOutStream(nil, outBufferSize),
			stderr: newOutStream(nil, outBufferSize),
		},
		oomBase: c.oom.count(),
		exited:  make(chan struct{}),
	}
}

// kinds returns the kinds of every event in the ring.
func kinds(t *testing.T, a *Agent) []api.EventKind {
	t.Helper()
	evs, _, err := a.events.Wait(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []api.EventKind
	for i, e := range evs {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, e.Seq)
		}
		out = append(out, e.Kind)
	}
	return out
}

func TestOOMEventPrecedesExitOfKilledProcess(t *testing.T) {
	tests := []struct {
		name string
		// watcherSawIt: the memory.events watcher reported the kill before
		// the exit was recorded.
		watcherSawIt bool
		kills        int
		want         []api.EventKind
		oomKilled    bool
	}{
		{"exit path notices the oom kill", false, 1, []api.EventKind{api.EventKind_OOM, api.EventKind_EXIT}, true},
		{"watcher noticed first: no duplicate", true, 1, []api.EventKind{api.EventKind_OOM, api.EventKind_EXIT}, true},
		{"no oom kill: exit only", false, 0, []api.EventKind{api.EventKind_EXIT}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, c, path := fakeContainer(t, 0)
			writeMemoryEvents(t, path, tt.kills)
			if tt.watcherSawIt {
				c.oom.check()
			}
			a.recordExit(c, c.init, 137, time.Now())
			got := kinds(t, a)
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("events %v, want %v", got, tt.want)
			}
			w := c.init.wait(context.Background(), 0)
			if !w.Exited || w.ExitStatus != 137 || w.OomKilled != tt.oomKilled {
				t.Fatalf("wait = %+v, want exit 137 oom_killed=%v", w, tt.oomKilled)
			}
			if c.getStatus() != statusStopped {
				t.Fatalf("status %s after init exit", c.getStatus())
			}
		})
	}
}

func TestOOMBeforeProcessStartIsNotBlamedOnIt(t *testing.T) {
	a, c, path := fakeContainer(t, 2)
	exec := fakeProcess(c, "e1", 43)
	writeMemoryEvents(t, path, 2)
	a.recordExit(c, exec, 0, time.Now())
	if w := exec.wait(context.Background(), 0); w.OomKilled {
		t.Fatal("exec blamed for oom kills that happened before it started")
	}
	if got := kinds(t, a); fmt.Sprint(got) != fmt.Sprint([]api.EventKind{api.EventKind_EXIT}) {
		t.Fatalf("events %v, want only EXIT", got)
	}
}

func TestReadOOMKills(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, data string
		want       uint64
		fails      bool
	}{
		{"counter", "oom 3\noom_kill 2\n", 2, false},
		{"absent counter", "low 0\n", 0, false},
		{"garbage", "oom_kill x\n", 0, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprint(i))
			os.WriteFile(p, []byte(tt.data), 0o644)
			n, err := readOOMKills(p)
			if (err != nil) != tt.fails || n != tt.want {
				t.Fatalf("got %d, %v", n, err)
			}
		})
	}
}

func TestWatchRefusesFileWithoutChangeNotification(t *testing.T) {
	path := filepath.Join(t.TempDir(), "memory.events")
	writeMemoryEvents(t, path, 0)
	c := newOOMCounter(path, func(uint64) {})
	// A regular file cannot be polled for changes, unlike a cgroup file.
	stop, err := c.watch()
	if err == nil {
		stop()
		t.Skip("regular files are pollable here")
	}
}
