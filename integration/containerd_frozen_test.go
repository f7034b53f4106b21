package integration

import (
	"syscall"
	"testing"
	"time"
)

// TestContainerdFrozenVMMCallsTimeOutAndKillStillWorks is fault matrix row
// 7's hang: the VMM is stopped (SIGSTOP) for longer than every timeout, so
// the agent never answers. An exec fails instead of hanging, the box goes
// unhealthy, and `ctr task kill -s SIGKILL` and `ctr task delete` still
// work while the VMM is still stopped, with TaskExit 137, and nothing is
// left (the harness's leak checks). A frozen guest is the same to the
// shim as a hung agent; an agent that crashes is PID 1 dying, a kernel
// panic: row 6 (TestContainerdGuestKernelPanicReportsExit137). Verified
// two-sided: before the shim killed the VM when the guest did not take a
// SIGKILL, ctr task kill failed with "context deadline exceeded" after 30 s,
// no TaskExit came, and the box, its VMM and its mounts were left.
func TestContainerdFrozenVMMCallsTimeOutAndKillStillWorks(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	id := c.runDetached(t, boxliteRuntime, fastHealthFlags("500ms"), "sleep", "1000")
	vmm := c.taskPid(t, id)
	if !l.waitHealth(id, "healthy", time.Minute) {
		t.Fatalf("no healthy event: health events %q", l.healthOf(id))
	}
	if err := syscall.Kill(vmm, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, a stopped process is not left behind.
	defer syscall.Kill(vmm, syscall.SIGCONT)
	if !l.waitHealth(id, "healthy unhealthy", time.Minute) {
		t.Fatalf("no unhealthy event while the VMM was stopped: health events %q", l.healthOf(id))
	}
	r := c.ctr(t, "task", "exec", "--exec-id", "frozen", id, "true")
	t.Logf("exec into the frozen box: exit %d after %v, stderr %q", r.code, r.elapsed, r.stderr)
	if r.code == 0 {
		t.Errorf("exec into a frozen box succeeded")
	}
	r = c.ctr(t, "task", "kill", "-s", "SIGKILL", id)
	t.Logf("kill of the frozen box: exit %d after %v, stderr %q", r.code, r.elapsed, r.stderr)
	if r.code != 0 {
		t.Errorf("ctr task kill -s SIGKILL of a frozen box: exit %d, stderr %q", r.code, r.stderr)
	}
	if !l.waitFor(id, "/tasks/exit=137", 2*time.Minute) {
		t.Fatalf("no TaskExit 137 after killing the frozen box: events %q", fmtEvents(l.of(id)))
	}
	pidGone(t, vmm, "frozen VMM")
	r = c.ctr(t, "task", "delete", id)
	if r.code != 0 {
		t.Errorf("ctr task delete: exit %d, stderr %q", r.code, r.stderr)
	}
	c.mustRun(t, "container", "rm", id)
}
