package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/cgrouptest"
	"github.com/boxlite/boxlite/pkg/shim"
)

// memoryCgroupDir returns the memory-hierarchy directory of the cgroup pid
// is in (v1 memory controller, or the v2 group).
func memoryCgroupDir(t testing.TB, pid int) string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	var unified string
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "memory" {
			return filepath.Join("/sys/fs/cgroup/memory", parts[2])
		}
		if parts[0] == "0" && parts[1] == "" {
			unified = filepath.Join("/sys/fs/cgroup", parts[2])
		}
	}
	if unified == "" {
		t.Fatalf("no memory cgroup in /proc/%d/cgroup:\n%s", pid, data)
	}
	return unified
}

// memoryLimitFile is the name of the memory limit's file in the memory
// cgroup at dir.
func memoryLimitFile(dir string) string {
	if strings.HasPrefix(dir, "/sys/fs/cgroup/memory/") {
		return "memory.limit_in_bytes"
	}
	return "memory.max"
}

// TestContainerdVMMRunsInItsOwnCgroup: a box's VMM is alone in a cgroup of
// its own, under the shim's, limited to the VM's RAM plus QEMU's overhead
// and to a number of threads; the cgroup goes with the box (the harness's
// leak check looks for it).
func TestContainerdVMMRunsInItsOwnCgroup(t *testing.T) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	vmm := c.taskPid(t, id)
	shim := c.shimOf(t, id)
	dir := memoryCgroupDir(t, vmm)
	if want := vmmCgroupPrefix + filepath.Base(shimStateDir(testNamespace, id)); filepath.Base(dir) != want {
		t.Fatalf("VMM in memory cgroup %s, want one named %s", dir, want)
	}
	if parent := memoryCgroupDir(t, shim); filepath.Dir(dir) != parent {
		t.Errorf("VMM cgroup %s is not under the shim's %s", dir, parent)
	}
	procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if got := strings.Fields(string(procs)); len(got) != 1 || got[0] != strconv.Itoa(vmm) {
		t.Errorf("VMM cgroup holds %v, want the VMM %d alone", got, vmm)
	}
	limitFile := memoryLimitFile(dir)
	limit, err := os.ReadFile(filepath.Join(dir, limitFile))
	if err != nil {
		t.Fatal(err)
	}
	// The default box has 256 MiB; the limit adds QEMU's overhead (and
	// TCG's code cache) but is far from unlimited.
	if n, err := strconv.ParseInt(strings.TrimSpace(string(limit)), 10, 64); err != nil || n <= 256<<20 || n > 2<<30 {
		t.Errorf("VMM cgroup %s = %q, want a limit above the VM's 256 MiB and below 2 GiB", limitFile, limit)
	}
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("VMM cgroup %s left after delete: %v", dir, err)
	}
}

// TestContainerdShimAndVMMMovedToAnotherCgroup is fault matrix row 15: the
// shim and its VMM are moved to another cgroup while the box runs, as
// systemd does when it reorganises its slices. Exits, delete and the host's
// OOM detection must still work, and the VMM's own (now empty) cgroup must
// still be removed. Verified two-sided: with the OOM counter noticing the
// move but not counting the new cgroup, the OOM subtest gets TaskExit 137
// with no TaskOOM and fails.
func TestContainerdShimAndVMMMovedToAnotherCgroup(t *testing.T) {
	// Made first, so that it is removed last: after the boxes are gone.
	moved := cgrouptest.New(t, "boxlite-moved")
	c := startContainerd(t)
	move := func(pid int) {
		t.Helper()
		// The cgroup is made in every hierarchy (v1) or the one (v2).
		dirs, _ := filepath.Glob("/sys/fs/cgroup/*" + moved)
		if d := filepath.Join("/sys/fs/cgroup", moved); dirExists(d) {
			dirs = append(dirs, d)
		}
		if len(dirs) == 0 {
			t.Fatalf("no cgroup %s", moved)
		}
		for _, d := range dirs {
			if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
				t.Fatalf("move %d to %s: %v", pid, d, err)
			}
		}
	}
	movedMem := func() string {
		if d := filepath.Join("/sys/fs/cgroup/memory", moved); dirExists(d) {
			return d
		}
		return filepath.Join("/sys/fs/cgroup", moved)
	}()
	// waitFollowed waits until the shim logged that host OOM detection
	// follows the VMM into the cgroup it was moved to.
	waitFollowed := func(vmm int) {
		t.Helper()
		want := fmt.Sprintf(`cgroup=%s`, movedMem)
		deadline := time.Now().Add(30 * time.Second)
		for {
			data, _ := os.ReadFile(c.logPath)
			for _, line := range strings.Split(string(data), "\n") {
				if strings.Contains(line, "vmm was moved to another cgroup") && strings.Contains(line, want) &&
					strings.Contains(line, fmt.Sprintf("pid=%d", vmm)) {
					return
				}
			}
			if time.Now().After(deadline) {
				c.dumpLog(t)
				t.Fatalf("the shim never noticed the VMM %d moved to %s", vmm, movedMem)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	t.Run("exit and delete", func(t *testing.T) {
		l := c.subscribe(t)
		id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
		vmm, shim := c.taskPid(t, id), c.shimOf(t, id)
		own := memoryCgroupDir(t, vmm)
		move(shim)
		move(vmm)
		waitFollowed(vmm)
		c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
		if !l.waitFor(id, "/tasks/exit=137", time.Minute) {
			t.Fatalf("no TaskExit 137 after the move: events %q", fmtEvents(l.of(id)))
		}
		c.mustRun(t, "task", "delete", id)
		c.mustRun(t, "container", "rm", id)
		pidGone(t, vmm, "VMM")
		pidGone(t, shim, "shim")
		if _, err := os.Stat(own); !os.IsNotExist(err) {
			t.Errorf("the VMM's own cgroup %s left after it was moved out: %v", own, err)
		}
	})

	t.Run("host OOM after the move", func(t *testing.T) {
		l := c.subscribe(t)
		// Booted cold: a clone's RAM is the template file's page cache,
		// which the limit would keep evicting and the guest refaulting.
		id := c.runDetached(t, boxliteRuntime, []string{"--null-io", "--annotation", shim.AnnotationTemplates + "=false"}, "sleep", "1000")
		vmm := c.taskPid(t, id)
		move(vmm)
		waitFollowed(vmm)
		// Room for 24 MiB more in the cgroup it was moved to, then the box
		// writes 60 MiB to its /dev/shm.
		limitFile := memoryLimitFile(movedMem)
		limit := anonBytes(t, movedMem) + 24<<20
		if err := os.WriteFile(filepath.Join(movedMem, limitFile), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
			t.Fatal(err)
		}
		r := c.ctr(t, "task", "exec", "--exec-id", "fill", id, "sh", "-c", "dd if=/dev/zero of=/dev/shm/x bs=1M count=60")
		if r.code == 0 {
			t.Fatalf("an exec that outgrew the VMM's new cgroup succeeded: %+v", r)
		}
		if !l.waitFor(id, "/tasks/exit=137", time.Minute) {
			t.Fatalf("no TaskExit 137 after the host OOM kill: events %q", fmtEvents(l.of(id)))
		}
		got := fmtEvents(l.of(id))
		if i := strings.Index(got, "/tasks/oom"); i < 0 || i > strings.Index(got, "/tasks/exit") {
			t.Errorf("events %q: want TaskOOM before the exits (the OOM happened in the cgroup the VMM was moved to)", got)
		}
		pidGone(t, vmm, "OOM-killed VMM")
		c.mustRun(t, "task", "delete", id)
		c.mustRun(t, "container", "rm", id)
		// Unlimited again for whatever else runs in it.
		os.WriteFile(filepath.Join(movedMem, limitFile), []byte("-1"), 0o644)
	})
}
