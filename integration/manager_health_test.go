package integration

import (
	"syscall"
	"testing"
)

// TestManagerHealthCheckFollowsTheVM: a box probed every 200 ms becomes
// healthy, turns unhealthy while its VMM is stopped (SIGSTOP: the agent
// cannot answer) and healthy again once it continues; the events say so and
// inspect reads the same from the shim after the run -d manager exited.
// Verified two-sided: without the shim's checker no /tasks/health event
// comes and inspect shows no health.
func TestManagerHealthCheckFollowsTheVM(t *testing.T) {
	m := newMgr(t)
	lines := m.events()
	id := m.runD("--health-interval", "200ms", "--health-timeout", "1s", "--health-start-period", "0s", "--health-retries", "2",
		"--", "sleep", "1000")
	_, vmm := m.pids(id)
	waitHealth := func(want string) {
		t.Helper()
		for {
			f := waitEvent(t, lines, "/tasks/health", id)
			if f[len(f)-1] == want {
				return
			}
		}
	}
	waitHealth("healthy")
	if got := m.inspect(id, "{{.Health}}"); got != "healthy" {
		t.Errorf("inspect health %q, want healthy", got)
	}
	if err := syscall.Kill(vmm, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitHealth("unhealthy")
	if err := syscall.Kill(vmm, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitHealth("healthy")
	m.ok("rm", "--force", id)
}

// Health checks are on by default; --no-health-check turns them off, and a
// box without them is still reaped and reported when its VMM dies (health
// never owns teardown).
func TestManagerHealthCheckIsOnByDefaultAndCanBeTurnedOff(t *testing.T) {
	m := newMgr(t)
	on := m.runD("--", "sleep", "1000")
	if got := m.inspect(on, "{{.Health}}"); got != "starting" {
		t.Errorf("default health %q, want starting (first probe after 30s)", got)
	}
	off := m.runD("--no-health-check", "--", "sleep", "1000")
	if got := m.inspect(off, "{{.Health}}"); got != "disabled" {
		t.Errorf("health with --no-health-check %q, want disabled", got)
	}
	lines := m.events()
	_, vmm := m.pids(off)
	if err := syscall.Kill(vmm, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if f := waitEvent(t, lines, "/tasks/exit", off); f[len(f)-1] != "137" {
		t.Errorf("exit event %q, want 137", f)
	}
	waitGone(t, "VMM", vmm)
	// ps: HEALTH is the running box's, and none for a stopped one.
	if row := m.psRow(on); row == nil || row[6] != "starting" {
		t.Errorf("ps row of the checked box %q, want HEALTH starting", row)
	}
	if row := m.psRow(off); row == nil || row[2] != "stopped" || row[5] != "-" || row[6] != "-" {
		t.Errorf("ps row of the stopped box %q, want no VMM-PID and HEALTH -", row)
	}
	m.ok("rm", off)
	m.ok("rm", "--force", on)
}
