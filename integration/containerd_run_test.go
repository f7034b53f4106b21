package integration

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"
	"time"
)

// runRm is `ctr run --rm --runtime RT [flags] IMAGE ID args...`.
func (c *containerd) runRm(t testing.TB, runtime string, flags []string, args ...string) ctrResult {
	t.Helper()
	return c.runRmIn(t, nil, runtime, flags, args...)
}

// runRmIn is runRm with stdin. ctr run has no -i: it always relays its own
// stdin (here /dev/null when stdin is nil).
func (c *containerd) runRmIn(t testing.TB, stdin []byte, runtime string, flags []string, args ...string) ctrResult {
	t.Helper()
	id := c.newID(t, shortRuntime(runtime))
	full := append(append([]string{"run", "--rm"}, c.runtimeFlags(runtime)...), flags...)
	full = append(full, testImage, id)
	full = append(full, args...)
	if stdin != nil {
		return c.ctrIn(t, bytes.NewReader(stdin), full...)
	}
	return c.ctr(t, full...)
}

// shortRuntime names a runtime in container ids.
func shortRuntime(runtime string) string {
	if runtime == boxliteRuntime {
		return "bx"
	}
	return "runc"
}

// TestContainerdImportsTheOfflineImages checks the project's busybox images
// were imported whole and unpacked.
func TestContainerdImportsTheOfflineImages(t *testing.T) {
	c := startContainerd(t)
	out := c.mustRun(t, "images", "check")
	for _, img := range []string{testImage, noCmdImage} {
		var line string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, img+" ") {
				line = l
			}
		}
		if f := strings.Fields(line); !strings.Contains(line, " complete ") || len(f) == 0 || f[len(f)-1] != "true" {
			t.Errorf("%s: ctr images check says %q\n%s", img, line, out)
		}
	}
	if out := c.mustRun(t, "snapshots", "ls"); !strings.Contains(out, "Committed") {
		t.Errorf("no committed snapshot after import (image not unpacked):\n%s", out)
	}
}

func TestContainerdRunRmPrintsHiAndExits7(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, nil, "sh", "-c", "echo hi; exit 7")
	if r.stdout != "hi\n" || r.code != 7 {
		t.Fatalf("got stdout %q exit %d, want \"hi\\n\" exit 7 (stderr %q)", r.stdout, r.code, r.stderr)
	}
	if r.stderr != "" {
		t.Errorf("unexpected stderr %q", r.stderr)
	}
	t.Logf("ctr run --rm took %v", r.elapsed.Round(time.Millisecond))
}

func TestContainerdRunKeepsStdoutAndStderrApart(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, nil, "sh", "-c", "echo out; echo err >&2; echo out2; echo err2 >&2")
	if r.code != 0 || r.stdout != "out\nout2\n" || r.stderr != "err\nerr2\n" {
		t.Fatalf("got exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestContainerdExitCodesMatchRunc runs the same commands under boxlite and
// runc: exit codes 0, 7, and 137/143 from a child killed by a signal.
func TestContainerdExitCodesMatchRunc(t *testing.T) {
	c := startContainerd(t)
	cases := []struct {
		name string
		args []string
		want int
	}{
		{"true", []string{"true"}, 0},
		{"exit7", []string{"sh", "-c", "exit 7"}, 7},
		{"false", []string{"false"}, 1},
		// A child (not pid 1, which ignores signals it has no handler
		// for) killed by SIGKILL / SIGTERM: its status propagates.
		{"child-sigkill", []string{"sh", "-c", "sh -c 'kill -KILL $$'; exit $?"}, 137},
		{"child-sigterm", []string{"sh", "-c", "sh -c 'kill -TERM $$'; exit $?"}, 143},
		{"exit255", []string{"sh", "-c", "exit 255"}, 255},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bx := c.runRm(t, boxliteRuntime, nil, tc.args...)
			rc := c.runRm(t, runcRuntime, nil, tc.args...)
			if rc.code != tc.want {
				t.Fatalf("runc baseline: exit %d, want %d (stderr %q)", rc.code, tc.want, rc.stderr)
			}
			if bx.code != tc.want {
				t.Errorf("boxlite: exit %d, want %d (stdout %q stderr %q)", bx.code, tc.want, bx.stdout, bx.stderr)
			}
		})
	}
}

// TestContainerdSignalsFromCtrMatchRunc signals a running init with
// `ctr task kill` while `ctr run --rm` waits for it: SIGKILL kills it (137);
// SIGTERM, SIGHUP and SIGUSR1 reach its handlers, which exit 128+n.
func TestContainerdSignalsFromCtrMatchRunc(t *testing.T) {
	c := startContainerd(t)
	cases := []struct {
		signal string
		num    int
		trap   bool
	}{
		{"SIGKILL", 9, false},
		{"SIGTERM", 15, true},
		{"SIGHUP", 1, true},
		{"SIGUSR1", 10, true},
	}
	for _, tc := range cases {
		t.Run(tc.signal, func(t *testing.T) {
			script := "echo ready; while :; do sleep 0.05; done"
			if tc.trap {
				sig := strings.TrimPrefix(tc.signal, "SIG")
				script = fmt.Sprintf("trap 'echo got %s; exit %d' %s; %s", sig, 128+tc.num, sig, script)
			}
			var outs [2]ctrResult
			for i, rt := range []string{runcRuntime, boxliteRuntime} {
				id := c.newID(t, shortRuntime(rt))
				run := c.startCtr(t, nil, append(append([]string{"run", "--rm"}, c.runtimeFlags(rt)...), testImage, id, "sh", "-c", script)...)
				waitFor(t, 2*time.Minute, id+" ready", func() bool { return strings.Contains(run.stdout.String(), "ready") })
				c.mustRun(t, "task", "kill", "-s", tc.signal, id)
				outs[i] = run.wait(t)
			}
			want := 128 + tc.num
			if outs[0].code != want {
				t.Fatalf("runc baseline: exit %d, want %d (%+v)", outs[0].code, want, outs[0])
			}
			if outs[1].code != want || outs[1].stdout != outs[0].stdout {
				t.Errorf("boxlite: exit %d stdout %q; runc: exit %d stdout %q", outs[1].code, outs[1].stdout, outs[0].code, outs[0].stdout)
			}
		})
	}
}

func TestContainerdStdinReachesTheProcess(t *testing.T) {
	c := startContainerd(t)
	r := c.runRmIn(t, []byte("line one\nline two\n"), boxliteRuntime, nil, "sh", "-c", "cat; echo done")
	if r.code != 0 || r.stdout != "line one\nline two\ndone\n" {
		t.Fatalf("got exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	// A larger stdin, counted and hashed in the box.
	in := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	r = c.runRmIn(t, in, boxliteRuntime, nil, "sh", "-c", "wc -c")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "1048576" {
		t.Fatalf("1 MiB stdin: got exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestContainerdDifferentialAgainstRunc runs each command under runc and
// boxlite on the same image and compares stdout, stderr and exit code.
func TestContainerdDifferentialAgainstRunc(t *testing.T) {
	c := startContainerd(t)
	cases := []struct {
		name  string
		flags []string
		args  []string
	}{
		{"env", []string{"--env", "FOO=bar", "--env", "EMPTY="}, []string{"sh", "-c", "env | sort"}},
		{"cwd", []string{"--cwd", "/tmp"}, []string{"pwd"}},
		{"default-cwd", nil, []string{"pwd"}},
		{"user-numeric", []string{"--user", "1000:1000"}, []string{"id"}},
		{"user-name", []string{"--user", "user"}, []string{"sh", "-c", "id; echo $HOME"}},
		{"user-nobody", []string{"--user", "nobody"}, []string{"id"}},
		{"root-id", nil, []string{"id"}},
		{"hostname", []string{"--hostname", "box1"}, []string{"hostname"}},
		{"etc-passwd", nil, []string{"cat", "/etc/passwd", "/etc/group"}},
		{"args-with-spaces", nil, []string{"sh", "-c", "printf '[%s]\\n' \"$@\"", "x", "a b", "", "c"}},
		{"stderr-and-code", nil, []string{"sh", "-c", "echo to-err >&2; exit 3"}},
		{"pid1", nil, []string{"sh", "-c", "echo $$"}},
		{"umask", nil, []string{"sh", "-c", "umask"}},
		{"rootfs-listing", nil, []string{"ls", "/", "/home", "/tmp"}},
		{"readonly-rootfs", []string{"--read-only"}, []string{"sh", "-c", "touch /x; echo $?"}},
		{"nofile-rlimit", nil, []string{"sh", "-c", "ulimit -n"}},
		// No network: a loopback device only (the guest kernel must not
		// add tunnel devices such as sit0 to every namespace).
		{"network-devices", nil, []string{"sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"}},
		// The spec's own mounts (masked paths differ by design: crun
		// masks with the guest's /dev/null, and the guest has no ACPI).
		{"spec-mounts", nil, []string{"sh", "-c", "cut -d' ' -f2,3 /proc/mounts | grep -E '^/(dev|dev/pts|dev/shm|dev/mqueue|proc|sys|run) ' | sort"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rc := c.runRm(t, runcRuntime, tc.flags, tc.args...)
			bx := c.runRm(t, boxliteRuntime, tc.flags, tc.args...)
			if rc.stdout != bx.stdout || rc.stderr != bx.stderr || rc.code != bx.code {
				t.Errorf("differs from runc:\nrunc:    exit %d stdout %q stderr %q\nboxlite: exit %d stdout %q stderr %q",
					rc.code, rc.stdout, rc.stderr, bx.code, bx.stdout, bx.stderr)
			}
		})
	}
}

// TestContainerdDefaultHostnameMatchesRunc runs `hostname` without
// --hostname. containerd's spec then has a UTS namespace and no hostname:
// runc's container inherits the host's name; a box must not show the guest
// kernel's "(none)".
func TestContainerdDefaultHostnameMatchesRunc(t *testing.T) {
	c := startContainerd(t)
	rc := c.runRm(t, runcRuntime, nil, "hostname")
	bx := c.runRm(t, boxliteRuntime, nil, "hostname")
	if rc.code != 0 || bx.code != rc.code || bx.stdout != rc.stdout {
		t.Errorf("runc: exit %d %q; boxlite: exit %d %q (stderr %q)", rc.code, rc.stdout, bx.code, bx.stdout, bx.stderr)
	}
}

// TestContainerdOneMiBOfOutputMatchesRunc compares 1 MiB of stdout (and some
// stderr) byte for byte.
func TestContainerdOneMiBOfOutputMatchesRunc(t *testing.T) {
	c := startContainerd(t)
	args := []string{"sh", "-c", "seq 1 200000 | head -c 1048576; echo tail >&2"}
	// The baseline itself is not under test, and ctr with runc's shim now
	// and then loses the tail of a large output when the task exits
	// (seen once on a loaded machine: 1028096 of 1048576 bytes): it gets
	// three tries.
	var rc ctrResult
	for try := 1; try <= 3; try++ {
		if rc = c.runRm(t, runcRuntime, nil, args...); len(rc.stdout) == 1<<20 {
			break
		}
		t.Logf("runc baseline try %d printed %d bytes, want %d", try, len(rc.stdout), 1<<20)
	}
	if len(rc.stdout) != 1<<20 {
		t.Fatalf("runc baseline printed %d bytes, want %d", len(rc.stdout), 1<<20)
	}
	bx := c.runRm(t, boxliteRuntime, nil, args...)
	if sha256.Sum256([]byte(bx.stdout)) != sha256.Sum256([]byte(rc.stdout)) || bx.code != rc.code || bx.stderr != rc.stderr {
		t.Errorf("boxlite: %d bytes, exit %d, stderr %q; runc: %d bytes, exit %d, stderr %q",
			len(bx.stdout), bx.code, bx.stderr, len(rc.stdout), rc.code, rc.stderr)
	}
}
