package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// idleScript keeps a box's init running until SIGTERM, which it handles.
const idleScript = "echo started; trap 'exit 0' TERM; while :; do sleep 0.1; done"

// runDetached is `ctr run -d` of args under runtime; it returns the id.
func (c *containerd) runDetached(t testing.TB, runtime string, flags []string, args ...string) string {
	t.Helper()
	id := c.newID(t, shortRuntime(runtime))
	full := append(append(append([]string{"run", "-d"}, c.runtimeFlags(runtime)...), flags...), testImage, id)
	c.mustRun(t, append(full, args...)...)
	return id
}

// waitStatus polls `ctr task ls` until id has status.
func (c *containerd) waitStatus(t testing.TB, id, status string) {
	t.Helper()
	waitFor(t, time.Minute, id+" "+status, func() bool { return c.taskStatus(t, id) == status })
}

// execTimeout bounds one `ctr task exec` in a running box.
const execTimeout = 45 * time.Second

// execIn is `ctr task exec --exec-id EXEC ID args...` with stdin, bounded by
// execTimeout; ok is false when ctr had to be killed.
func (c *containerd) execIn(t testing.TB, stdin string, id, execID string, args ...string) (ctrResult, bool) {
	t.Helper()
	full := append(append([]string{"task", "exec"}, c.execFlags()...), "--exec-id", execID, id)
	return c.startCtr(t, strings.NewReader(stdin), append(full, args...)...).waitFor(execTimeout)
}

// TestContainerdDetachedTaskLifecycle drives a detached box through ctr the
// way an operator would, and the same steps under runc for comparison: task
// ls, ps, metrics, pause, resume, kill, delete, container rm.
func TestContainerdDetachedTaskLifecycle(t *testing.T) {
	c := startContainerd(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.runDetached(t, rt, nil, "sh", "-c", idleScript)
			if st := c.taskStatus(t, id); st != "RUNNING" {
				t.Fatalf("after run -d: status %q, want RUNNING", st)
			}
			pid := c.taskPid(t, id)
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); len(comm) == 0 {
				t.Errorf("task pid %d is not a live process", pid)
			} else if rt == boxliteRuntime && !strings.HasPrefix(string(comm), "qemu") {
				t.Errorf("boxlite task pid %d is %q, want the VMM (qemu)", pid, strings.TrimSpace(string(comm)))
			}

			ps := c.mustRun(t, "task", "ps", id)
			if lines := strings.Split(strings.TrimSpace(ps), "\n"); len(lines) < 2 || !strings.HasPrefix(lines[0], "PID") {
				t.Errorf("task ps: want a header and at least one process, got %q", ps)
			}

			m := c.ctr(t, "task", "metrics", id)
			if m.code != 0 || !strings.Contains(m.stdout, "METRIC") || !strings.Contains(m.stdout, "pids.current") {
				t.Errorf("task metrics: exit %d stdout %q stderr %q", m.code, m.stdout, m.stderr)
			} else {
				t.Logf("task metrics:\n%s", m.stdout)
			}

			c.mustRun(t, "task", "pause", id)
			if st := c.taskStatus(t, id); st != "PAUSED" {
				t.Errorf("after pause: status %q, want PAUSED", st)
			}
			if r := c.ctr(t, "task", "pause", id); r.code == 0 {
				t.Errorf("pause of a paused task succeeded; want an error")
			}
			c.mustRun(t, "task", "resume", id)
			if st := c.taskStatus(t, id); st != "RUNNING" {
				t.Errorf("after resume: status %q, want RUNNING", st)
			}
			if ps := c.mustRun(t, "task", "ps", id); len(strings.Split(strings.TrimSpace(ps), "\n")) < 2 {
				t.Errorf("task ps after resume: %q", ps)
			}

			c.mustRun(t, "task", "kill", id) // SIGTERM, handled: exit 0
			c.waitStatus(t, id, "STOPPED")
			if r := c.ctr(t, "task", "kill", id); r.code == 0 {
				t.Errorf("kill of a stopped task succeeded; want an error")
			}
			r := c.ctr(t, "task", "delete", id)
			if r.code != 0 {
				t.Fatalf("task delete: exit %d stderr %q", r.code, r.stderr)
			}
			if _, ok := c.taskList(t)[id]; ok {
				t.Errorf("task %s still listed after delete", id)
			}
			c.mustRun(t, "container", "rm", id)
			if out := c.mustRun(t, "container", "ls", "-q"); strings.Contains(out, id) {
				t.Errorf("container %s still listed after rm", id)
			}
			pidGone(t, pid, "task (VMM for boxlite)")
		})
	}
}

// TestContainerdTaskExecMatchesRunc runs execs in a detached box under
// boxlite and runc: output, exit codes, stdin, the process's environment,
// and a missing binary. `ctr task exec` waits for the exec's output FIFOs to
// reach EOF before it deletes the exec, so a shim that holds them open
// until Delete hangs ctr (reported as "did not finish").
func TestContainerdTaskExecMatchesRunc(t *testing.T) {
	c := startContainerd(t)
	execs := []struct {
		name, stdin string
		args        []string
		out         string
		code        int
	}{
		{"echo", "", []string{"sh", "-c", "echo from-exec"}, "from-exec\n", 0},
		{"exit5", "", []string{"sh", "-c", "echo five; exit 5"}, "five\n", 5},
		{"stdin", "abc\n", []string{"cat"}, "abc\n", 0},
		{"env-cwd", "", []string{"sh", "-c", "pwd; echo $PATH"}, "/\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n", 0},
	}
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.runDetached(t, rt, []string{"--null-io"}, "sh", "-c", idleScript)
			defer c.killAndDelete(t, id)
			for i, e := range execs {
				r, ok := c.execIn(t, e.stdin, id, "e"+strconv.Itoa(i), e.args...)
				if !ok {
					t.Errorf("exec %s: ctr task exec did not finish within %v (stdout %q)", e.name, execTimeout, r.stdout)
					continue
				}
				if r.stdout != e.out || r.code != e.code {
					t.Errorf("exec %s: got exit %d stdout %q stderr %q; want exit %d stdout %q", e.name, r.code, r.stdout, r.stderr, e.code, e.out)
				}
			}
			r, ok := c.execIn(t, "", id, "missing", "/no/such/binary")
			switch {
			case !ok:
				t.Errorf("exec of a missing binary: ctr did not finish within %v", execTimeout)
			case r.code == 0 || r.stderr == "":
				t.Errorf("exec of a missing binary: exit %d stderr %q, want an error", r.code, r.stderr)
			default:
				t.Logf("exec of a missing binary: exit %d: %s", r.code, strings.TrimSpace(r.stderr))
			}
			if ps := c.mustRun(t, "task", "ps", id); strings.Count(strings.TrimSpace(ps), "\n") > 2 {
				t.Errorf("execs left processes behind in the box:\n%s", ps)
			}
		})
	}
}

// TestContainerdTaskExecWithLogURIReportsExitCode runs execs whose output
// goes to a file (no FIFOs): ctr returns the exit code.
func TestContainerdTaskExecWithLogURIReportsExitCode(t *testing.T) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sh", "-c", idleScript)
	defer c.killAndDelete(t, id)
	for i, code := range []int{0, 5} {
		logf := filepath.Join(c.dir, fmt.Sprintf("exec%d.log", i))
		r, ok := c.startCtr(t, nil, "task", "exec", "--log-uri", "file://"+logf, "--exec-id", fmt.Sprintf("l%d", i), id,
			"sh", "-c", fmt.Sprintf("echo out-%d; echo err-%d >&2; exit %d", i, i, code)).waitFor(execTimeout)
		data, _ := os.ReadFile(logf)
		// One file takes both streams through two copies: their order
		// is not defined.
		if !ok || r.code != code || sortedLines(string(data)) != sortedLines(fmt.Sprintf("out-%d\nerr-%d\n", i, i)) {
			t.Errorf("exec %d: finished %v exit %d (want %d) log %q stderr %q", i, ok, r.code, code, data, r.stderr)
		}
	}
}

// killAndDelete SIGKILLs a task, deletes it and its container.
func (c *containerd) killAndDelete(t testing.TB, id string) {
	t.Helper()
	c.ctr(t, "task", "kill", "-s", "SIGKILL", id)
	waitFor(t, time.Minute, id+" stopped or gone", func() bool {
		st := c.taskStatus(t, id)
		return st == "STOPPED" || st == ""
	})
	c.ctr(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
}

// TestContainerdKillAndForceDeleteARunningBox checks `ctr task kill -s
// SIGKILL` reports 137 through `ctr task delete`, and that `ctr task delete
// --force` of a running box removes it.
func TestContainerdKillAndForceDeleteARunningBox(t *testing.T) {
	c := startContainerd(t)
	id := c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	vmm := c.taskPid(t, id)
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	r := c.ctr(t, "task", "delete", id)
	if r.code != 0 || !strings.Contains(r.stdout+r.stderr, "137") {
		t.Errorf("task delete after SIGKILL: exit %d stdout %q stderr %q, want exit status 137 reported", r.code, r.stdout, r.stderr)
	}
	c.mustRun(t, "container", "rm", id)
	pidGone(t, vmm, "VMM")

	id = c.runDetached(t, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	vmm = c.taskPid(t, id)
	if r := c.ctr(t, "task", "delete", id); r.code == 0 {
		t.Errorf("task delete of a running task succeeded without --force")
	}
	c.mustRun(t, "task", "delete", "--force", id)
	c.mustRun(t, "container", "rm", id)
	pidGone(t, vmm, "VMM")
}
