package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// vmmCgroupPrefix starts the name of every VMM's own cgroup (pkg/vmm's
// Config.Cgroup as pkg/shim names it: boxlite-vmm-<state dir>).
const vmmCgroupPrefix = "boxlite-vmm-"

// vmmCgroupDirs lists the VMM cgroups that exist now: in each hierarchy
// under this process's cgroup (a shim inherits the test's, through
// containerd or the manager), and under cgroup v2's /boxlite fallback.
func vmmCgroupDirs() map[string]bool {
	out := map[string]bool{}
	self, _ := os.ReadFile("/proc/self/cgroup")
	parents := []string{"/sys/fs/cgroup/boxlite"}
	for _, line := range strings.Split(string(self), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			parents = append(parents, filepath.Join("/sys/fs/cgroup", parts[2]), filepath.Join("/sys/fs/cgroup/unified", parts[2]))
		case strings.HasPrefix(parts[1], "name="):
		default:
			parents = append(parents, filepath.Join("/sys/fs/cgroup", parts[1], parts[2]))
		}
	}
	for _, p := range parents {
		dirs, _ := filepath.Glob(filepath.Join(p, vmmCgroupPrefix+"*"))
		for _, d := range dirs {
			out[d] = true
		}
	}
	return out
}

// assertNoVMMCgroups waits (bounded) until no VMM cgroup that mine selects
// exists, then fails the test for each one left and removes it (empty:
// rmdir; with a process in it, that process is a leak reported elsewhere).
func assertNoVMMCgroups(t testing.TB, mine func(dir string) bool) {
	t.Helper()
	left := func() []string {
		var out []string
		for d := range vmmCgroupDirs() {
			if mine(d) {
				out = append(out, d)
			}
		}
		return out
	}
	deadline := time.Now().Add(settleTimeout)
	for len(left()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	for _, d := range left() {
		procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		t.Errorf("leak: VMM cgroup %s left (processes: %q)", d, strings.Fields(string(procs)))
		os.Remove(d)
	}
}

// vmmCgroupOf reports whether dir is the VMM cgroup (or its template
// builder's) of the box whose shim state directory is stateDir.
func vmmCgroupOf(dir, stateDir string) bool {
	name := vmmCgroupPrefix + filepath.Base(stateDir)
	base := filepath.Base(dir)
	return base == name || base == name+"-build"
}
