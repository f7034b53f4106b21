package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/boxlite/boxlite/pkg/shim"
)

// memCgroup is a host memory cgroup made for one test.
type memCgroup struct {
	dir string
	// limit is the limit's file name in the version in use.
	limit string
}

// newMemCgroup makes a memory cgroup under the test process's own (cgroup
// v1 memory controller, or v2 with memory enabled for children), removed at
// cleanup after moving anything left in it back to the parent.
func newMemCgroup(t *testing.T) *memCgroup {
	t.Helper()
	parent := memoryCgroupDir(t, os.Getpid())
	cg := memCgroup{limit: memoryLimitFile(parent)}
	cg.dir = filepath.Join(parent, fmt.Sprintf("boxlite-test-%d", os.Getpid()))
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		t.Skipf("cannot make a memory cgroup under %s (run as root on a host with the memory controller): %v", parent, err)
	}
	if _, err := os.Stat(filepath.Join(cg.dir, cg.limit)); err != nil {
		os.Remove(cg.dir)
		t.Skipf("no memory controller in %s (enable it in the parent's cgroup.subtree_control): %v", cg.dir, err)
	}
	t.Cleanup(func() {
		procs, _ := os.ReadFile(filepath.Join(cg.dir, "cgroup.procs"))
		for _, pid := range strings.Fields(string(procs)) {
			os.WriteFile(filepath.Join(parent, "cgroup.procs"), []byte(pid), 0o644)
		}
		if err := os.Remove(cg.dir); err != nil {
			t.Errorf("remove test cgroup: %v", err)
		}
	})
	return &cg
}

// anonBytes is the memory of the cgroup at dir (and its children) that
// cannot be reclaimed without swap: memory.stat's total_rss (v1) or anon
// (v2).
func anonBytes(t testing.TB, dir string) int64 {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "memory.stat"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, _ := strings.Cut(line, " ")
		if k == "total_rss" || k == "anon" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("memory.stat %s: %v", k, err)
			}
			return n
		}
	}
	t.Fatalf("no total_rss or anon in %s/memory.stat", dir)
	return 0
}

// TestManagerHostOOMKillOfTheVMMIsReportedAsOOM: when the host's OOM killer
// kills the VMM (its memory cgroup is full), the box reports an OOM event
// and then exit 137, and inspect says OOMKilled (kata #4419 reported such a
// death as exit 0). Verified two-sided: without the shim's OOM-count check
// the exit 137 comes with no /tasks/oom and the test fails.
func TestManagerHostOOMKillOfTheVMMIsReportedAsOOM(t *testing.T) {
	m := newMgr(t)
	// Booted cold: a clone's RAM is the template file's page cache, which
	// the cgroup's limit would keep evicting and the guest refaulting (a
	// thrash, not an OOM).
	m.env = append(m.env, shim.TemplatesEnv+"=off")
	cg := newMemCgroup(t)
	// The manager, so the shim and the VMM it starts, run in the cgroup.
	wrapper := filepath.Join(t.TempDir(), "boxlite-in-cgroup")
	script := fmt.Sprintf("#!/bin/sh\necho $$ > %s/cgroup.procs || exit 99\nexec %s \"$@\"\n", cg.dir, boxliteBin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	m.binary = wrapper
	id := m.runD("--", "sleep", "1000")
	m.binary = boxliteBin
	lines := m.events()
	_, vmm := m.pids(id)
	// Room for 24 MiB more than the memory that cannot be reclaimed, then
	// the box writes 60 MiB to its /dev/shm. (Room counted from the usage
	// would let the write take the page cache's place.)
	limit := anonBytes(t, cg.dir) + 24<<20
	if err := os.WriteFile(filepath.Join(cg.dir, cg.limit), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		t.Fatal(err)
	}
	r := m.run(nil, "exec", id, "--", "sh", "-c", "dd if=/dev/zero of=/dev/shm/x bs=1M count=60")
	if r.code == 0 {
		t.Fatalf("exec that outgrew the VMM's cgroup succeeded: %v", r)
	}
	waitEvent(t, lines, "/tasks/oom", id)
	if f := waitEvent(t, lines, "/tasks/exit", id); f[len(f)-1] != "137" {
		t.Errorf("exit event %q, want status 137", f)
	}
	waitGone(t, "VMM", vmm)
	if got := m.inspect(id, "{{.Status}} {{.ExitStatus}} {{.OOMKilled}}"); got != "stopped 137 true" {
		t.Errorf("record after the host OOM kill: %q, want stopped 137 true", got)
	}
	m.ok("rm", id)
}
