package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/console"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// sortedLines sorts the lines of s: stdout and stderr reach one log file
// through two copies, so their interleaving is not defined.
func sortedLines(s string) string {
	l := strings.Split(strings.TrimSuffix(s, "\n"), "\n")
	sort.Strings(l)
	return strings.Join(l, "\n")
}

// TestContainerdLogURIFileReceivesOutput runs with --log-uri file://, in the
// foreground and detached, under runc and boxlite: both streams land in the
// file, and ctr gets the exit code.
func TestContainerdLogURIFileReceivesOutput(t *testing.T) {
	c := startContainerd(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			// containerd's runc shim now and then loses a stream of a
			// process that exits at once ("error copying stderr" in its
			// log, seen once in a CI run, 0 of 15 alone): the baseline gets
			// three tries, boxlite one.
			tries := 1
			if rt == runcRuntime {
				tries = 3
			}
			for i := 1; i <= tries; i++ {
				logf := filepath.Join(c.dir, fmt.Sprintf("%s-%d.log", shortRuntime(rt), i))
				r := c.runRm(t, rt, []string{"--log-uri", "file://" + logf}, "sh", "-c", "echo out; echo err >&2; exit 2")
				data, _ := os.ReadFile(logf)
				if r.code == 2 && sortedLines(string(data)) == "err\nout" && r.stdout == "" {
					break
				}
				if i < tries {
					t.Logf("%s, try %d: exit %d, ctr stdout %q, log %q: trying again", rt, i, r.code, r.stdout, data)
					continue
				}
				t.Errorf("foreground: exit %d (want 2), ctr stdout %q, log %q", r.code, r.stdout, data)
			}

			logd := filepath.Join(c.dir, shortRuntime(rt)+"-d.log")
			id := c.runDetached(t, rt, []string{"--log-uri", "file://" + logd}, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done")
			c.waitStatus(t, id, "STOPPED")
			c.mustRun(t, "task", "delete", id)
			c.mustRun(t, "container", "rm", id)
			if data, _ := os.ReadFile(logd); string(data) != "line1\nline2\nline3\n" {
				t.Errorf("detached: log %q", data)
			}
		})
	}
}

// buildLogger builds the binary:// logger in integration/testdata/logger.
func buildLogger(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(shortTempDir(t), "logger")
	if _, err := runHostTimeout(5*time.Minute, "go", "build", "-C", repoRoot, "-o", bin, "./integration/testdata/logger"); err != nil {
		t.Fatalf("build the test logger: %v", err)
	}
	return bin
}

// TestContainerdBinaryLoggerReceivesOutput runs with --log-uri binary:// under
// runc and boxlite: the logger gets stdout and stderr apart, and the
// container's id and namespace.
func TestContainerdBinaryLoggerReceivesOutput(t *testing.T) {
	c := startContainerd(t)
	logger := buildLogger(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			dir := filepath.Join(c.dir, "logger-"+shortRuntime(rt))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			id := c.newID(t, shortRuntime(rt))
			args := append(append([]string{"run", "--rm"}, c.runtimeFlags(rt)...),
				"--log-uri", "binary://"+logger+"?dir="+dir, testImage, id, "sh", "-c", "echo out; echo err >&2; exit 4")
			r := c.ctr(t, args...)
			if r.code != 4 {
				t.Errorf("exit %d, want 4 (stderr %q)", r.code, r.stderr)
			}
			want := map[string]string{
				"stdout": "out\n", "stderr": "err\n",
				"env": fmt.Sprintf("CONTAINER_ID=%s\nCONTAINER_NAMESPACE=%s\n", id, testNamespace),
			}
			for name, w := range want {
				// The logger may still be flushing when ctr returns.
				var got []byte
				deadline := time.Now().Add(10 * time.Second)
				for {
					got, _ = os.ReadFile(filepath.Join(dir, name))
					if string(got) == w || time.Now().After(deadline) {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				if string(got) != w {
					t.Errorf("logger %s: got %q, want %q", name, got, w)
				}
			}
		})
	}
}

// runOnPty runs ctr with a new pseudo-terminal of the given size as its
// stdin, stdout and stderr, and returns what the terminal showed and ctr's
// exit code.
func (c *containerd) runOnPty(t testing.TB, rows, cols uint16, args ...string) (string, int) {
	t.Helper()
	master, slavePath, err := console.NewPty()
	if err != nil {
		t.Fatalf("new pty: %v", err)
	}
	defer master.Close()
	if err := master.Resize(console.WinSize{Height: rows, Width: cols}); err != nil {
		t.Fatal(err)
	}
	slave, err := os.OpenFile(slavePath, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(c.bin, "ctr"), append([]string{"-a", c.addr, "-n", testNamespace}, args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	p, err := reaper.Default().Start(cmd)
	slave.Close()
	if err != nil {
		t.Fatalf("start ctr on a pty: %v", err)
	}
	var out bytes.Buffer
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(&out, master)
		copied <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		t.Fatalf("ctr %v on a pty did not finish within %v", args, ctrTimeout)
	}
	// Once every holder of the slave is gone, reading the master fails
	// with EIO: the output is complete.
	select {
	case err := <-copied:
		if err != nil && !errors.Is(err, syscall.EIO) {
			t.Errorf("read pty: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("pty output did not end 10s after ctr exited")
	}
	return out.String(), e.Status
}

// TestContainerdRunWithTTYMatchesRunc runs `ctr run --rm -t` on a real
// terminal under runc and boxlite: the process sees a terminal of the
// caller's size, its output comes back, and so does its exit code.
func TestContainerdRunWithTTYMatchesRunc(t *testing.T) {
	c := startContainerd(t)
	// ctr sizes the terminal right after Start: give the resize a moment
	// to land before reading the size.
	script := "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; sleep 0.5; stty size; echo $TERM; exit 3"
	var outs [2]string
	for i, rt := range []string{runcRuntime, boxliteRuntime} {
		id := c.newID(t, shortRuntime(rt))
		args := append(append([]string{"run", "--rm", "-t"}, c.runtimeFlags(rt)...), testImage, id, "sh", "-c", script)
		out, code := c.runOnPty(t, 37, 101, args...)
		out = filterStderr(strings.ReplaceAll(out, "\r", ""))
		if code != 3 || !strings.Contains(out, "is-a-tty\n37 101\n") {
			t.Errorf("%s: exit %d (want 3), terminal showed %q", rt, code, out)
		}
		outs[i] = out
	}
	if outs[0] != outs[1] {
		t.Errorf("terminal output differs: runc %q, boxlite %q", outs[0], outs[1])
	}
}
