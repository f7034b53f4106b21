package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMemoryEventsPath(t *testing.T) {
	root := t.TempDir()
	defer func(old string) { cgroupRoot = old }(cgroupRoot)
	cgroupRoot = root
	// A v2 group whose memory.events exists.
	v2 := filepath.Join(root, "kubepods", "box")
	os.MkdirAll(v2, 0o755)
	os.WriteFile(filepath.Join(v2, "memory.events"), nil, 0o644)

	tests := []struct {
		name, procCgroup, want, wantErr string
	}{
		{"v1 memory", "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n", filepath.Join(root, "memory/process_api/abc/memory.oom_control"), ""},
		{"v1 co-mounted", "3:cpu,memory:/a\n", filepath.Join(root, "cpu,memory/a/memory.oom_control"), ""},
		{"v2", "0::/kubepods/box\n", filepath.Join(v2, "memory.events"), ""},
		{"hybrid without v1 memory", "1:cpu:/\n0::/elsewhere\n", "", "cgroup v2 memory controller"},
		{"nothing", "garbage\n", "", "no memory cgroup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := memoryEventsPath([]byte(tt.procCgroup))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %q, %v; want error %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestParseOOMKill(t *testing.T) {
	tests := []struct {
		name, data string
		want       uint64
		ok         bool
	}{
		{"v1 oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", 3, true},
		{"v2 memory.events", "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n", 2, true},
		{"old kernel", "oom_kill_disable 0\nunder_oom 0\n", 0, false},
		{"garbage", "oom_kill x\n", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseOOMKill([]byte(tt.data))
			if (err == nil) != tt.ok || got != tt.want {
				t.Fatalf("got %d, %v; want %d ok=%v", got, err, tt.want, tt.ok)
			}
		})
	}
}

func TestOOMCounterIncreased(t *testing.T) {
	path := filepath.Join(t.TempDir(), "memory.oom_control")
	os.WriteFile(path, []byte("oom_kill 4\n"), 0o644)
	c, err := newOOMCounterAt(path)
	if err != nil || c.counts[0].base != 4 {
		t.Fatalf("counter %+v, %v", c, err)
	}
	if c.increased() {
		t.Fatal("increased with no new kill")
	}
	os.WriteFile(path, []byte("oom_kill 5\n"), 0o644)
	if !c.increased() {
		t.Fatal("a new kill not seen")
	}
	os.Remove(path)
	if c.increased() {
		t.Fatal("a removed cgroup reads as a kill")
	}
	if (*oomCounter)(nil).increased() {
		t.Fatal("nil counter reads as a kill")
	}
}

// TestOOMCounterFollowsAMove: a process moved to another memory cgroup
// has its OOM kill counted there, so the counter must count that cgroup
// from the move on (fault matrix row 15). Verified two-sided: with follow
// made a no-op, the kill in the new cgroup is not seen.
func TestOOMCounterFollowsAMove(t *testing.T) {
	root := t.TempDir()
	defer func(old string) { cgroupRoot = old }(cgroupRoot)
	cgroupRoot = root
	for _, g := range []string{"a", "b"} {
		os.MkdirAll(filepath.Join(root, "memory", g), 0o755)
		os.WriteFile(filepath.Join(root, "memory", g, "memory.oom_control"), []byte("oom_kill 7\n"), 0o644)
	}
	c, err := newOOMCounterAt(filepath.Join(root, "memory", "a", "memory.oom_control"))
	if err != nil {
		t.Fatal(err)
	}
	// The real follow reads /proc/<pid>/cgroup; here the move is a path.
	if added, err := c.add(filepath.Join(root, "memory", "b", "memory.oom_control")); err != nil || !added {
		t.Fatalf("the cgroup moved to: added %v, %v", added, err)
	}
	if added, err := c.add(filepath.Join(root, "memory", "b", "memory.oom_control")); err != nil || added || len(c.counts) != 2 {
		t.Fatalf("a cgroup counted twice: %+v, %v", c.counts, err)
	}
	if c.increased() {
		t.Fatal("increased with no new kill")
	}
	os.WriteFile(filepath.Join(root, "memory", "b", "memory.oom_control"), []byte("oom_kill 8\n"), 0o644)
	if !c.increased() {
		t.Fatal("a kill in the cgroup moved to not seen")
	}
}

// On these hosts the test process's own memory cgroup has a readable count.
func TestOOMCounterOfThisProcess(t *testing.T) {
	c, err := newOOMCounter(os.Getpid())
	if err != nil {
		t.Skipf("no memory cgroup counter on this host: %v", err)
	}
	if c.increased() {
		t.Fatal("increased right after creation")
	}
}
