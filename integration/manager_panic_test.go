package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestManagerGuestKernelPanicReportsExit137 is fault matrix row 6 through
// the manager: a --privileged box crashes its guest kernel with
// `echo c > /proc/sysrq-trigger`. The box exits 137 (the exit event says
// so, and run reports it), the VMM is reaped, the shim logs the end of the
// console with the panic, and rm works (the harness's leak checks).
func TestManagerGuestKernelPanicReportsExit137(t *testing.T) {
	m := newMgr(t)
	lines := m.events()
	id := m.runD("--privileged", "--", "sh", "-c", "sleep 1; echo c > /proc/sysrq-trigger; echo survived")
	_, vmm := m.pids(id)
	if f := waitEvent(t, lines, "/tasks/exit", id); f[len(f)-1] != "137" {
		t.Errorf("exit event %q, want status 137", f)
	}
	waitGone(t, "VMM", vmm)
	if got := m.inspect(id, "{{.Status}} {{.ExitStatus}}"); got != "stopped 137" {
		t.Errorf("record after the guest panicked: %q, want stopped 137", got)
	}
	if out := m.ok("logs", id); strings.Contains(out, "survived") {
		t.Errorf("the box went on after the panic: %q", out)
	}
	log, err := os.ReadFile(filepath.Join(m.inspect(id, "{{.Bundle}}"), "shim.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "console: ") || !strings.Contains(string(log), "Kernel panic") {
		t.Errorf("the shim did not log the console's panic message:\n%s", log)
	}
	m.ok("rm", id)
}

// TestManagerPrivilegedBox: --privileged gives the box's process every
// capability and a writable /proc/sys in the guest, and only there; without
// it the process has containerd's default set.
func TestManagerPrivilegedBox(t *testing.T) {
	m := newMgr(t)
	script := "grep CapEff /proc/self/status; echo 1 > /proc/sys/vm/drop_caches && echo wrote"
	priv := m.ok("run", "--rm", "--privileged", "--rootfs", m.rootfs, "--", "sh", "-c", script)
	if !strings.Contains(priv, "CapEff:\t000001ff") || !strings.Contains(priv, "wrote") {
		t.Errorf("privileged box: %q, want (nearly) every capability and a writable /proc/sys", priv)
	}
	r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "sh", "-c", script)
	if strings.Contains(r.stdout, "CapEff:\t000001ff") || strings.Contains(r.stdout, "wrote") {
		t.Errorf("unprivileged box: %q, want the default capabilities and a read-only /proc/sys", r.stdout)
	}
}
