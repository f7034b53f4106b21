package integration

// ctr helpers for the containerd tests: every command runs through the
// reaper against the test's private daemon and namespace.

import (
	"bytes"
	"context"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// runtimeFlags are the `ctr run` flags selecting runtime and keeping every
// path ctr and the runc shim would create under the test's directory (their
// defaults are /run/containerd/fifo and /run/containerd/runc).
func (c *containerd) runtimeFlags(runtime string) []string {
	flags := []string{"--runtime", runtime, "--fifo-dir", filepath.Join(c.dir, "fifo")}
	if runtime == runcRuntime {
		flags = append(flags, "--runc-root", filepath.Join(c.dir, "runc"))
	}
	return flags
}

// execFlags are the `ctr task exec` flags keeping its FIFOs in the test's
// directory.
func (c *containerd) execFlags() []string {
	return []string{"--fifo-dir", filepath.Join(c.dir, "fifo")}
}

// ctrResult is what one ctr command did.
type ctrResult struct {
	stdout, stderr string
	code           int
	elapsed        time.Duration
}

// ctr runs ctr against the daemon, in the test namespace, with no stdin.
func (c *containerd) ctr(t testing.TB, args ...string) ctrResult {
	t.Helper()
	return c.ctrIn(t, nil, args...)
}

// ctrIn runs ctr with stdin and waits for it.
func (c *containerd) ctrIn(t testing.TB, stdin io.Reader, args ...string) ctrResult {
	t.Helper()
	r := c.startCtr(t, stdin, args...)
	return r.wait(t)
}

// ctrCmd is a ctr command started in the background.
type ctrCmd struct {
	args   []string
	proc   *reaper.Process
	stdout *syncBuffer
	stderr *syncBuffer
	began  time.Time
}

// startCtr starts ctr without waiting for it.
func (c *containerd) startCtr(t testing.TB, stdin io.Reader, args ...string) *ctrCmd {
	t.Helper()
	full := append([]string{"-a", c.addr, "-n", testNamespace}, args...)
	cmd := exec.Command(filepath.Join(c.bin, "ctr"), full...)
	r := &ctrCmd{args: args, stdout: &syncBuffer{}, stderr: &syncBuffer{}}
	cmd.Stdout, cmd.Stderr = r.stdout, r.stderr
	if stdin != nil {
		cmd.Stdin = stdin
	}
	r.began = time.Now()
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatalf("start ctr %v: %v", args, err)
	}
	r.proc = p
	return r
}

// wait waits for the ctr command, bounded by ctrTimeout, and fails the test
// if it does not finish.
func (r *ctrCmd) wait(t testing.TB) ctrResult {
	t.Helper()
	res, ok := r.waitFor(ctrTimeout)
	if !ok {
		t.Fatalf("ctr %v did not finish within %v (killed): stdout %q stderr %q", r.args, ctrTimeout, res.stdout, res.stderr)
	}
	return res
}

// waitFor waits up to d for the ctr command; a command still running then is
// killed and reported with ok false.
func (r *ctrCmd) waitFor(d time.Duration) (res ctrResult, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	e, err := r.proc.Wait(ctx)
	if err != nil {
		r.proc.Signal(syscall.SIGKILL)
		e, _ = r.proc.Wait(context.Background())
	}
	return ctrResult{stdout: r.stdout.String(), stderr: filterStderr(r.stderr.String()), code: e.Status, elapsed: time.Since(r.began)}, err == nil
}

// filterStderr drops ctr's cgroup v1 deprecation warning.
func filterStderr(s string) string {
	var keep []string
	for _, l := range strings.SplitAfter(s, "\n") {
		if l != "" && !strings.Contains(l, cgroupV1Warning) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

// syncBuffer is a bytes.Buffer safe for a writer and a concurrent reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitFor polls cond until it holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// mustRun runs ctr and fails the test unless it exits 0.
func (c *containerd) mustRun(t testing.TB, args ...string) string {
	t.Helper()
	r := c.ctr(t, args...)
	if r.code != 0 {
		t.Fatalf("ctr %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// taskList parses `ctr task ls`: id -> {pid, status}.
func (c *containerd) taskList(t testing.TB) map[string][2]string {
	t.Helper()
	out := c.mustRun(t, "task", "ls")
	tasks := map[string][2]string{}
	for i, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if i == 0 || len(f) < 3 {
			continue
		}
		tasks[f[0]] = [2]string{f[1], f[2]}
	}
	return tasks
}

// taskStatus is the STATUS column of `ctr task ls` for id, or "" if absent.
func (c *containerd) taskStatus(t testing.TB, id string) string {
	t.Helper()
	return c.taskList(t)[id][1]
}

// taskPid is the PID column of `ctr task ls` for id: for boxlite, the VMM.
func (c *containerd) taskPid(t testing.TB, id string) int {
	t.Helper()
	pid, err := strconv.Atoi(c.taskList(t)[id][0])
	if err != nil {
		t.Fatalf("no pid for task %s in ctr task ls", id)
	}
	return pid
}
