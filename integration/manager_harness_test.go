package integration

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
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

// The thin manager's tests drive bin/boxlite, which bootstraps
// bin/containerd-shim-boxlite-v1, exactly as a user does.
var (
	boxliteBin = filepath.Join(repoRoot, "bin", "boxlite")
	shimBin    = filepath.Join(repoRoot, "bin", "containerd-shim-boxlite-v1")
)

// mgrTimeout bounds one boxlite invocation.
const mgrTimeout = 3 * time.Minute

// mgr is one test's manager environment: a state directory and a rootfs.
type mgr struct {
	t      testing.TB
	state  string
	rootfs string
	// binary is the boxlite to run (default boxliteBin).
	binary string
	// env is added to the environment of every boxlite run (and so of
	// the shims it starts).
	env []string
	// shimDirs are the shim state directories that existed before the
	// test (other boxes of the machine).
	shimDirs map[string]bool
	// cgroups are the VMM cgroups that existed when the test began.
	cgroups map[string]bool
}

// newMgr skips without the built binaries, makes a short state directory
// and a busybox rootfs, and registers the leak assertion that ends every
// manager test: no box left, no shim, QEMU or zombie it started alive, no
// mount left.
func newMgr(t testing.TB) *mgr {
	t.Helper()
	for _, p := range []string{shimBin, boxliteBin} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("%s missing: run make build", p)
		}
	}
	m := &mgr{t: t, state: filepath.Join(shortTempDir(t), "st"), rootfs: busyboxRootfs(t), binary: boxliteBin,
		shimDirs: shimStateDirs(), cgroups: vmmCgroupDirs()}
	t.Cleanup(m.assertClean)
	return m
}

// shimStateDirs lists the shims' VM state directories (each holds a box's
// sockets, share and QEMU root).
func shimStateDirs() map[string]bool {
	entries, _ := os.ReadDir(shimStateRoot)
	out := map[string]bool{}
	for _, e := range entries {
		out[filepath.Join(shimStateRoot, e.Name())] = true
	}
	return out
}

// assertNoNewShimState fails the test for a shim state directory, or a
// mount under one, that appeared since the test began: the share, QEMU's
// root and the sockets of every box must be gone with it.
func (m *mgr) assertNoNewShimState() {
	t := m.t
	// Other tests may run at the same time: a directory served by another
	// test's live shim is theirs, and one still going away is given time.
	isNew := func(d string) bool { return !m.shimDirs[d] && !m.othersShimDirs()[d] }
	deadline := time.Now().Add(settleTimeout)
	for {
		var left []string
		for d := range shimStateDirs() {
			if isNew(d) {
				left = append(left, d)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			for _, d := range left {
				t.Errorf("leak: shim state directory %s left", d)
			}
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasPrefix(f[4], shimStateRoot+"/") {
			continue
		}
		if dir := filepath.Join(shimStateRoot, strings.Split(strings.TrimPrefix(f[4], shimStateRoot+"/"), "/")[0]); isNew(dir) {
			t.Errorf("leak: mount left in a shim state directory: %s", line)
		}
	}
}

// othersShimDirs returns the shim state directories of the live shims of
// other tests: shims whose address is not in this test's state directory.
func (m *mgr) othersShimDirs() map[string]bool {
	out := map[string]bool{}
	for _, p := range listProcs() {
		f := strings.Fields(p.cmdline)
		if len(f) == 0 || filepath.Base(f[0]) != shimBinary || p.state == "Z" {
			continue
		}
		var ns, id, addr string
		for i := 1; i+1 < len(f); i++ {
			switch f[i] {
			case "-namespace":
				ns = f[i+1]
			case "-id":
				id = f[i+1]
			case "-address":
				addr = f[i+1]
			}
		}
		if id != "" && !strings.Contains(addr, m.state) {
			out[shimStateDir(ns, id)] = true
		}
	}
	return out
}

// mgrResult is what one boxlite invocation did.
type mgrResult struct {
	stdout, stderr string
	code           int
}

func (r mgrResult) String() string {
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", r.code, clipStr(r.stdout), clipStr(r.stderr))
}

func clipStr(s string) string {
	if len(s) > 400 {
		return s[:200] + "..." + s[len(s)-200:]
	}
	return s
}

// command returns the boxlite command line for args with --state.
func (m *mgr) command(args ...string) *exec.Cmd {
	cmd := exec.Command(m.binary, append([]string{"--state", m.state}, args...)...)
	cmd.Env = append(append(os.Environ(), "BOXLITE_STATE="), m.env...)
	return cmd
}

// run runs boxlite with args and stdin (nil: none) and returns its result.
func (m *mgr) run(stdin []byte, args ...string) mgrResult {
	m.t.Helper()
	cmd := m.command(args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		m.t.Fatalf("start boxlite: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), mgrTimeout)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		m.t.Fatalf("boxlite %v did not finish: %v", args, err)
	}
	return mgrResult{stdout: out.String(), stderr: errOut.String(), code: e.Status}
}

// ok runs boxlite and fails the test unless it exits 0; it returns stdout.
func (m *mgr) ok(args ...string) string {
	m.t.Helper()
	r := m.run(nil, args...)
	if r.code != 0 {
		m.t.Fatalf("boxlite %v: %v", args, r)
	}
	return r.stdout
}

// runD starts a detached box and returns its id.
func (m *mgr) runD(args ...string) string {
	m.t.Helper()
	out := m.ok(append([]string{"run", "-d", "--rootfs", m.rootfs}, args...)...)
	id := strings.TrimSpace(out)
	if id == "" || strings.Contains(id, "\n") {
		m.t.Fatalf("run -d printed %q, want an id", out)
	}
	return id
}

// inspect returns the --format template's value for box ref.
func (m *mgr) inspect(ref, format string) string {
	m.t.Helper()
	return strings.TrimSpace(m.ok("inspect", "--format", format, ref))
}

// pids returns the shim's and the VMM's pid of box ref.
func (m *mgr) pids(ref string) (shim, vmm int) {
	m.t.Helper()
	f := strings.Fields(m.inspect(ref, "{{.ShimPid}} {{.VMMPid}}"))
	if len(f) != 2 {
		m.t.Fatalf("inspect pids: %q", f)
	}
	shim, _ = strconv.Atoi(f[0])
	vmm, _ = strconv.Atoi(f[1])
	if shim <= 0 || vmm <= 0 {
		m.t.Fatalf("box %s: shim pid %d, vmm pid %d", ref, shim, vmm)
	}
	return shim, vmm
}

// psRow returns the ps columns of box id, or nil.
func (m *mgr) psRow(id string) []string {
	m.t.Helper()
	for _, line := range strings.Split(m.ok("ps"), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[0] == id {
			return f
		}
	}
	return nil
}

// events runs `boxlite events` until the test ends and returns its lines.
func (m *mgr) events() <-chan string {
	m.t.Helper()
	cmd := m.command("events")
	out, err := cmd.StdoutPipe()
	if err != nil {
		m.t.Fatal(err)
	}
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		m.t.Fatal(err)
	}
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	m.t.Cleanup(func() {
		p.Signal(syscall.SIGINT)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if e, err := p.Wait(ctx); err != nil || e.Status != 0 {
			p.Signal(syscall.SIGKILL)
			p.Wait(context.Background())
			m.t.Errorf("boxlite events: %v %v: %s", e, err, errOut.String())
		}
	})
	// It serves once the socket accepts connections (before, a leftover
	// socket refuses them).
	sock := filepath.Join(m.state, "events.sock")
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return lines
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("boxlite events never served %s: %v: %s", sock, err, errOut.String())
		}
		select {
		case <-p.Done():
			m.t.Fatalf("boxlite events exited: %s", errOut.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitEvent reads event lines until one has the topic and box id, and
// returns its fields.
func waitEvent(t testing.TB, lines <-chan string, topic, id string) []string {
	t.Helper()
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("events ended before %s %s", topic, id)
			}
			f := strings.Fields(l)
			if len(f) >= 3 && f[1] == topic && f[2] == id {
				return f
			}
		case <-timeout:
			t.Fatalf("no %s event for %s", topic, id)
		}
	}
}

// waitGone waits (bounded, by pidfd) until process pid has exited and is
// no zombie; on failure it names its State and PPid.
func waitGone(t testing.TB, what string, pid int) {
	t.Helper()
	out, _, err := reaper.Default().Reap(pid, time.Now().Add(30*time.Second))
	if err == nil && out != reaper.TimedOut {
		// Reaped by us, or exited as someone else's child: that parent
		// must collect it too.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	t.Errorf("%s pid %d still present (%v, %v):\n%s", what, pid, out, err, statusLines(status))
}

// assertClean removes any box the test left (an error: tests remove their
// boxes), then asserts that every child of the test process (the shims and
// VMMs that reparented to it) exits and is reaped, and no mount is left.
func (m *mgr) assertClean() {
	t := m.t
	if _, err := os.Stat(m.state); err == nil {
		r := m.run(nil, "ps", "-q")
		for _, id := range strings.Fields(r.stdout) {
			t.Errorf("leak: box %s left by the test", id)
			m.run(nil, "rm", "--force", id)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	var live []string
	for _, pid := range reaper.Children(os.Getpid()) {
		// Only this test's shims (-address <state>/grpc.sock) and VMMs
		// (sharing its rootfs); anything else assertNoLeaks reports.
		// A zombie (empty cmdline) is dead already: collect it too.
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if len(cmdline) > 0 && !bytes.Contains(cmdline, []byte(m.state)) && !bytes.Contains(cmdline, []byte(m.rootfs)) {
			continue
		}
		out, _, err := reaper.Default().Reap(pid, deadline)
		if err != nil || out == reaper.TimedOut {
			status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			live = append(live, fmt.Sprintf("pid %d: %s", pid, strings.ReplaceAll(statusLines(status), "\n", " ")))
			syscall.Kill(pid, syscall.SIGKILL)
			reaper.Default().Reap(pid, time.Now().Add(10*time.Second))
		}
	}
	if len(live) > 0 {
		t.Errorf("leak: %d live shim(s)/VMM(s):\n%s", len(live), strings.Join(live, "\n"))
	}
	assertNoLeaks(t, 0, m.rootfs, m.state)
	m.assertNoNewShimState()
	// A VMM cgroup that appeared during the test and is empty now is
	// this test's (a live one may be another test's box).
	assertNoVMMCgroups(t, func(d string) bool {
		procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		return !m.cgroups[d] && len(strings.TrimSpace(string(procs))) == 0
	})
}

// tenMiB is what `seq 1 2000000 | head -c 10485760` prints.
func tenMiB() []byte {
	var b bytes.Buffer
	for i := 1; b.Len() < 10<<20; i++ {
		b.WriteString(strconv.Itoa(i))
		b.WriteByte('\n')
	}
	return b.Bytes()[:10<<20]
}

// startBoxlite starts boxlite in the background and returns the process
// and its output buffers.
func (m *mgr) startBoxlite(args ...string) (*reaper.Process, *lockedBuffer, *lockedBuffer) {
	m.t.Helper()
	cmd := m.command(args...)
	out, errOut := &lockedBuffer{}, &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, errOut
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		m.t.Fatal(err)
	}
	return p, out, errOut
}

// lockedBuffer is a bytes.Buffer for a writer goroutine and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
	// grew is signalled on every write.
	grew chan struct{}
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.grew == nil {
		l.grew = make(chan struct{}, 1)
	}
	select {
	case l.grew <- struct{}{}:
	default:
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor waits until the buffer contains s or the process exits.
func (l *lockedBuffer) waitFor(t testing.TB, p *reaper.Process, s string) {
	t.Helper()
	timeout := time.After(2 * time.Minute)
	for !strings.Contains(l.String(), s) {
		l.mu.Lock()
		if l.grew == nil {
			l.grew = make(chan struct{}, 1)
		}
		grew := l.grew
		l.mu.Unlock()
		select {
		case <-grew:
		case <-p.Done():
			if strings.Contains(l.String(), s) {
				return
			}
			t.Fatalf("process exited before printing %q: %q", s, l.String())
		case <-timeout:
			t.Fatalf("%q never printed: %q", s, l.String())
		}
	}
}

var _ io.Writer = (*lockedBuffer)(nil)
