package vmm

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/cgroups/v3"
)

// TestVMMCgroupConfinesAProcess makes a VMM cgroup on this host, moves a
// process into it, reads back its limits and OOM counter, and removes it,
// including through the record KillStale uses.
func TestVMMCgroupConfinesAProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make cgroups")
	}
	name := "boxlite-vmm-test-" + strconv.Itoa(os.Getpid())
	limit := vmmMemoryLimit(256, AccelTCG)
	cg, err := newVMMCgroup(name, limit, vmmPidsLimit(4))
	if errors.Is(err, errNoCgroupControllers) {
		t.Skipf("no cgroup controllers for a vmm here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer cg.remove()
	memFile, pidsFile := "memory.limit_in_bytes", "pids.max"
	memDir, pidsDir := cg.dirs[0], cg.dirs[len(cg.dirs)-1]
	if cgroups.Mode() == cgroups.Unified {
		memFile = "memory.max"
	}
	if got := readTrim(t, filepath.Join(memDir, memFile)); got != strconv.FormatInt(limit, 10) {
		t.Errorf("%s = %s, want %d", memFile, got, limit)
	}
	if got := readTrim(t, filepath.Join(pidsDir, pidsFile)); got != strconv.Itoa(vmmPidsBase+4) {
		t.Errorf("%s = %s, want %d", pidsFile, got, vmmPidsBase+4)
	}
	cmd := exec.Command("sleep", "100")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	if err := cg.add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	self, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	if !strings.Contains(string(self), "/"+name+"\n") {
		t.Errorf("process not in %s:\n%s", name, self)
	}
	c, err := newOOMCounterAt(cg.eventsPath)
	if err != nil || c.increased() {
		t.Fatalf("oom counter of the new cgroup: %+v, %v", c, err)
	}
	if err := cg.remove(); err == nil {
		t.Fatal("removed a cgroup with a live process in it")
	}
	cmd.Process.Kill()
	cmd.Wait()
	// The shim died: its delete action finds the record.
	dir := t.TempDir()
	if err := cg.record(filepath.Join(dir, CgroupFileName)); err != nil {
		t.Fatal(err)
	}
	removeStateFiles(dir)
	for _, d := range cg.dirs {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s left after removeStateFiles: %v", d, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, CgroupFileName)); !os.IsNotExist(err) {
		t.Errorf("record left: %v", err)
	}
}

// A damaged record never makes the cleanup remove anything but cgroups.
func TestRemoveRecordedCgroupOnlyRemovesCgroups(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "keep")
	if err := os.Mkdir(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, CgroupFileName), []byte(victim+"\n/sys/fs/cgroup/../../"+victim+"\n"), 0o600)
	removeRecordedCgroup(dir)
	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("a directory outside the cgroup mount was removed: %v", err)
	}
}

func TestVMMMemoryLimit(t *testing.T) {
	if got, want := vmmMemoryLimit(512, AccelKVM), int64(512+vmmOverheadMiB)<<20; got != want {
		t.Errorf("kvm: %d, want %d", got, want)
	}
	if got, want := vmmMemoryLimit(512, AccelTCG), int64(512+vmmOverheadMiB+tcgCodeCacheMiB)<<20; got != want {
		t.Errorf("tcg: %d, want %d", got, want)
	}
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}
