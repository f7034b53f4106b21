package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rootfsOf is the rootfs directory containerd's bundle for id holds.
func (c *containerd) rootfsOf(id string) string {
	return filepath.Join(c.dir, "state", "io.containerd.runtime.v2.task", testNamespace, id, "rootfs")
}

// mountedUnder returns the mount points at or below dir.
func mountedUnder(dir string) []string {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	return out
}

// TestContainerdRestartKeepsTheBoxRunning stops containerd while a box runs
// and starts it again on the same root and state: the box (shim and VMM)
// keeps running, `ctr task ls` shows it, and kill, delete and container rm
// still work, with the exit event reaching the new daemon.
func TestContainerdRestartKeepsTheBoxRunning(t *testing.T) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sh", "-c", idleScript)
	vmm := c.taskPid(t, id)
	shim := c.shimOf(t, id)

	c.stop(t)
	time.Sleep(time.Second)
	for _, pid := range []int{vmm, shim} {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err != nil || strings.Contains(string(st), "State:\tZ") {
			t.Fatalf("pid %d (VMM %d, shim %d) did not survive the containerd stop:\n%s", pid, vmm, shim, statusLines(st))
		}
	}
	c.start(t)

	tasks := c.taskList(t)
	if got := tasks[id]; got[1] != "RUNNING" || got[0] != fmt.Sprint(vmm) {
		t.Fatalf("after restart ctr task ls shows %s as %v, want pid %d RUNNING (all: %v)", id, got, vmm, tasks)
	}
	if ps := c.mustRun(t, "task", "ps", id); len(strings.Split(strings.TrimSpace(ps), "\n")) < 2 {
		t.Errorf("task ps after restart: %q", ps)
	}
	l := c.subscribe(t)
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
	if !l.waitFor(id, "/tasks/exit=137 /tasks/delete=137", 20*time.Second) {
		t.Errorf("events after restart: got %q, want TaskExit and TaskDelete with 137", fmtEvents(l.of(id)))
	}
	pidGone(t, vmm, "VMM")
	pidGone(t, shim, "shim")
}

// TestContainerdShimDeathRunsTheDeleteAction kills a box's shim, with
// SIGKILL (fault matrix row 1) and SIGTERM (row 2, which the shim handles
// by shutting down): containerd notices, runs the shim binary's delete
// action, which kills the VMM and unmounts the rootfs, and publishes
// TaskExit 137; the container can then be removed and nothing is left.
func TestContainerdShimDeathRunsTheDeleteAction(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		t.Run(unix.SignalName(sig), func(t *testing.T) { testContainerdShimDeath(t, sig) })
	}
}

func testContainerdShimDeath(t *testing.T, sig syscall.Signal) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	vmm := c.taskPid(t, id)
	shim := c.shimOf(t, id)
	rootfs := c.rootfsOf(id)
	if len(mountedUnder(rootfs)) == 0 {
		t.Fatalf("rootfs %s is not mounted while the box runs", rootfs)
	}
	l := c.subscribe(t)

	if err := syscall.Kill(shim, sig); err != nil {
		t.Fatal(err)
	}
	if !l.waitFor(id, "/tasks/exit=137", time.Minute) {
		t.Errorf("no TaskExit 137 after the shim was killed: events %q", fmtEvents(l.of(id)))
	}
	pidGone(t, shim, "killed shim")
	pidGone(t, vmm, "VMM of the killed shim")
	waitFor(t, 30*time.Second, "task "+id+" gone from ctr task ls", func() bool {
		_, ok := c.taskList(t)[id]
		return !ok
	})
	if m := mountedUnder(rootfs); len(m) > 0 {
		t.Errorf("rootfs still mounted after the delete action: %v", m)
	}
	if d := shimStateDir(testNamespace, id); dirExists(d) {
		t.Errorf("shim state directory %s left after the delete action", d)
	}
	t.Logf("events: %s", fmtEvents(l.of(id)))
	c.mustRun(t, "container", "rm", id)
}

// TestContainerdVMMSIGKILLReportsExit137 kills a box's VMM: TaskExit 137
// reaches containerd, the task shows STOPPED, delete and container rm work,
// and the shim exits.
func TestContainerdVMMSIGKILLReportsExit137(t *testing.T) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	vmm := c.taskPid(t, id)
	shim := c.shimOf(t, id)
	l := c.subscribe(t)
	if err := syscall.Kill(vmm, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !l.waitFor(id, "/tasks/exit=137", time.Minute) {
		t.Fatalf("no TaskExit 137 after the VMM was killed: events %q", fmtEvents(l.of(id)))
	}
	pidGone(t, vmm, "killed VMM")
	c.waitStatus(t, id, "STOPPED")
	r := c.ctr(t, "task", "delete", id)
	if r.code != 0 {
		t.Fatalf("task delete after VMM death: exit %d stderr %q", r.code, r.stderr)
	}
	c.mustRun(t, "container", "rm", id)
	if !l.waitFor(id, "/tasks/delete=137", 20*time.Second) {
		t.Errorf("no TaskDelete 137: events %q", fmtEvents(l.of(id)))
	}
	if got := fmtEvents(l.of(id)); got != "/tasks/exit=137 /tasks/delete=137" {
		t.Errorf("events after VMM kill: got %q, want exactly one TaskExit and one TaskDelete", got)
	}
	pidGone(t, shim, "shim")
	if m := mountedUnder(c.rootfsOf(id)); len(m) > 0 {
		t.Errorf("rootfs still mounted: %v", m)
	}
}

// TestContainerdGuestKernelPanicReportsExit137 crashes the guest kernel
// from a privileged box with `echo c > /proc/sysrq-trigger` (fault matrix
// row 6): the VM exits at once (panic=-1, -no-reboot), the task exits 137
// with TaskExit published, the VMM is reaped, the shim logs the end of the
// console with the panic, and `ctr run --rm` cleans up (the harness's leak
// checks).
func TestContainerdGuestKernelPanicReportsExit137(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	r := c.runRm(t, boxliteRuntime, []string{"--privileged"}, "sh", "-c", "echo c > /proc/sysrq-trigger; echo survived")
	if r.code != 137 {
		t.Errorf("ctr run: exit %d stderr %q, want 137", r.code, r.stderr)
	}
	id := c.ids[len(c.ids)-1]
	if !l.waitFor(id, "/tasks/exit=137", time.Minute) {
		t.Errorf("no TaskExit 137 after the guest panicked: events %q", fmtEvents(l.of(id)))
	}
	data, err := os.ReadFile(c.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "console: ") || !strings.Contains(string(data), "Kernel panic") {
		c.dumpLog(t)
		t.Errorf("the shim did not log the console's panic message")
	}
}
