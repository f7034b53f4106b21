package integration

// The nerdctl harness: every TestNerdctl* test runs nerdctl (built by
// scripts/build-nerdctl.sh) against a private containerd started inside a
// network namespace the test made (ip netns add, lo up). containerd, its
// shims, their VMMs or runc containers, nerdctl itself and the OCI hooks
// nerdctl puts in the spec (which re-exec nerdctl to run CNI) all live in
// that namespace, so nerdctl's default bridge (nerdctl0, 10.4.0.0/24), its
// iptables rules and its port mappings are made there and go when the test
// deletes it. Only the network namespace is entered (netns.Do), never a
// mount namespace as `ip netns exec` would make, so the containerd
// harness's leak check still sees every mount.
//
// nerdctl gets private paths: its data root and CNI config directory are
// under the daemon's directory. What it still shares with the host: CNI's
// host-local allocations and result cache under /var/lib/cni, and the port
// reserver's pid file under /run/nerdctl; the cleanup checks that CNI's
// state no longer names a container of the test and that no port reserver
// is alive, and removes the pid files (nerdctl leaves them, under runc too).
//
// At cleanup, in order: no container may be left (any is force-removed and
// fails the test); the containerd leak check (shims, QEMU, zombies,
// mounts, shim state); the namespace holds no interface but lo and
// nerdctl0 and no iptables rule naming a container of the test; the
// namespace is deleted and gone; the host's namespace gained no bridge,
// veth, tap or CNI rule.

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/netns"
)

// bothRuntimes are the runtimes every nerdctl step runs under: runc first,
// as the reference.
var bothRuntimes = []string{runcRuntime, boxliteRuntime}

// nerdctlBridgeGateway is the host side of nerdctl's default bridge
// (nerdctl0, 10.4.0.0/24).
const nerdctlBridgeGateway = "10.4.0.1"

// nerdctlBinDir builds (or finds in the cache) nerdctl once per test binary.
var nerdctlBinDir = scriptOutput("build-nerdctl.sh", "--print-dir", "nerdctl", 15*time.Minute)

// nsSeq numbers the nerdctl test namespaces of this test binary.
var nsSeq atomic.Uint32

// nerdctlEnv is nerdctl pointed at a private containerd running in a
// network namespace of the test.
type nerdctlEnv struct {
	c *containerd
	// netns is the namespace's name under /var/run/netns; nsPath its path.
	netns, nsPath string
	// bin is the nerdctl binary.
	bin string
	// dataRoot and netConf are nerdctl's data root and CNI config
	// directory, under the daemon's directory.
	dataRoot, netConf string
	// times collects the wall time of each step per runtime.
	times *stepTimes
}

// startNerdctl makes the test's network namespace, starts a private
// containerd in it and registers the cleanup checks (see the file comment).
func startNerdctl(t *testing.T) *nerdctlEnv {
	t.Helper()
	binDir, err := nerdctlBinDir()
	if err != nil {
		t.Fatal(err)
	}
	for _, tool := range []string{"iptables", "script"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run make setup", tool)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		t.Fatal("CNI plugins missing in /usr/lib/cni: run make setup (containernetworking-plugins)")
	}
	n := &nerdctlEnv{
		bin: filepath.Join(binDir, "nerdctl"), netns: fmt.Sprintf("bxn%d-%d", os.Getpid(), nsSeq.Add(1)),
		times: &stepTimes{},
	}
	n.nsPath = filepath.Join("/var/run/netns", n.netns)
	hostBefore := hostNetSnapshot(t)
	mustHost(t, "ip", "netns", "add", n.netns)
	t.Cleanup(func() {
		if _, err := runHost("ip", "netns", "del", n.netns); err != nil {
			t.Errorf("delete network namespace %s: %v", n.netns, err)
		}
		if dirExists(n.nsPath) {
			t.Errorf("network namespace %s still there after ip netns del", n.nsPath)
		}
		n.assertHostUntouched(t, hostBefore)
	})
	mustHost(t, "ip", "-n", n.netns, "link", "set", "lo", "up")
	// Runs after the containerd leak check: every box is gone by then.
	t.Cleanup(func() { n.assertNamespaceClean(t) })
	n.c = startContainerd(t, inNetNS(n.nsPath))
	n.dataRoot, n.netConf = filepath.Join(n.c.dir, "nerdctl"), filepath.Join(n.c.dir, "net.d")
	if err := os.MkdirAll(n.netConf, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.removeLeftovers(t) })
	t.Cleanup(func() { n.times.log(t) })
	return n
}

// globalFlags are nerdctl's flags pointing every command (and the OCI
// hooks, which nerdctl builds from the same flags) at the private daemon
// and paths.
func (n *nerdctlEnv) globalFlags() []string {
	return []string{
		"--address", n.c.addr, "--namespace", testNamespace, "--data-root", n.dataRoot,
		"--cni-path", "/usr/lib/cni", "--cni-netconfpath", n.netConf,
	}
}

// env is nerdctl's environment: the hooks inherit it (nerdctl copies its
// own into the spec), so PATH must hold iptables for CNI's plugins.
func (n *nerdctlEnv) env() []string {
	return append(os.Environ(),
		"PATH="+filepath.Dir(n.bin)+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		// No host nerdctl.toml: the flags say everything.
		"NERDCTL_TOML="+filepath.Join(n.c.dir, "nerdctl.toml"))
}

// start starts nerdctl args inside the test's namespace without waiting.
func (n *nerdctlEnv) start(t testing.TB, args ...string) *ctrCmd {
	t.Helper()
	return n.startCmd(t, n.bin, append(n.globalFlags(), args...)...)
}

// startCmd starts a command inside the test's namespace with nerdctl's
// environment.
func (n *nerdctlEnv) startCmd(t testing.TB, name string, args ...string) *ctrCmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = n.env()
	r := &ctrCmd{args: args, stdout: &syncBuffer{}, stderr: &syncBuffer{}}
	cmd.Stdout, cmd.Stderr = r.stdout, r.stderr
	r.began = time.Now()
	p, err := startInNetNS(n.nsPath, cmd)
	if err != nil {
		t.Fatalf("start %s %v: %v", name, args, err)
	}
	r.proc = p
	return r
}

// nerdctl runs nerdctl args and waits (bounded by ctrTimeout).
func (n *nerdctlEnv) nerdctl(t testing.TB, args ...string) ctrResult {
	t.Helper()
	return n.start(t, args...).wait(t)
}

// must runs nerdctl args and fails the test unless it exits 0.
func (n *nerdctlEnv) must(t testing.TB, args ...string) string {
	t.Helper()
	r := n.nerdctl(t, args...)
	if r.code != 0 {
		t.Fatalf("nerdctl %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// timed runs nerdctl args as step under rt and records its wall time.
func (n *nerdctlEnv) timed(t testing.TB, step, rt string, args ...string) ctrResult {
	t.Helper()
	r := n.nerdctl(t, args...)
	n.times.add(step, rt, r.elapsed)
	return r
}

// runArgs are the arguments of `nerdctl run` under rt: the image is never
// pulled, and the container's id goes to a fresh cidfile.
func (n *nerdctlEnv) runArgs(t testing.TB, rt string, args ...string) ([]string, string) {
	t.Helper()
	cidfile := filepath.Join(n.c.dir, fmt.Sprintf("cid-%d", idSeq.Add(1)))
	return append([]string{"run", "--runtime", rt, "--pull", "never", "--cidfile", cidfile}, args...), cidfile
}

// run runs `nerdctl run ARGS` under rt as step, records the container's id
// for the leak check and returns the result and the id ("" if none was
// made).
func (n *nerdctlEnv) run(t testing.TB, step, rt string, args ...string) (ctrResult, string) {
	t.Helper()
	full, cidfile := n.runArgs(t, rt, args...)
	r := n.timed(t, step, rt, full...)
	return r, n.recordCID(cidfile)
}

// recordCID reads a cidfile and records the id for the leak check.
func (n *nerdctlEnv) recordCID(cidfile string) string {
	data, err := os.ReadFile(cidfile)
	if err != nil {
		return ""
	}
	id := strings.TrimSpace(string(data))
	if id != "" {
		n.c.ids = append(n.c.ids, id)
	}
	return id
}

// runTTY runs `nerdctl run ARGS` under rt on a pseudo-terminal (see tty)
// and records the container's id.
func (n *nerdctlEnv) runTTY(t testing.TB, step, rt string, args ...string) (ctrResult, string) {
	t.Helper()
	full, cidfile := n.runArgs(t, rt, args...)
	return n.tty(t, step, rt, full...), n.recordCID(cidfile)
}

// tty runs nerdctl ARGS through script(1), which gives it a
// pseudo-terminal, as step under rt; -e makes script exit with nerdctl's
// code. The terminal's output (stdout and stderr) is the result's stdout.
func (n *nerdctlEnv) tty(t testing.TB, step, rt string, args ...string) ctrResult {
	t.Helper()
	line := shellQuote(append([]string{n.bin}, append(n.globalFlags(), args...)...))
	r := n.startCmd(t, "script", "-qec", line, "/dev/null").wait(t)
	n.times.add(step, rt, r.elapsed)
	return r
}

// shellQuote quotes args for sh -c.
func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// inNS runs a short host command inside the test's namespace and returns
// its stdout.
func (n *nerdctlEnv) inNS(t testing.TB, name string, args ...string) string {
	t.Helper()
	r := n.startCmd(t, name, args...).wait(t)
	if r.code != 0 {
		t.Fatalf("%s %v in %s: exit %d: %s", name, args, n.netns, r.code, r.stderr)
	}
	return r.stdout
}

// dialIn connects to addr from inside the network namespace at nsPath: the
// socket is made there and used after the thread went back.
func dialIn(nsPath, addr string, timeout time.Duration) (net.Conn, error) {
	ns, err := netns.Open(nsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	var conn net.Conn
	err = netns.Do(ns, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return conn, err
}

// httpGet fetches / from addr inside the test's namespace and returns the
// whole response.
func (n *nerdctlEnv) httpGet(addr string) (string, error) {
	conn, err := dialIn(n.nsPath, addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: box\r\n\r\n"); err != nil {
		return "", err
	}
	data, err := io.ReadAll(conn)
	return string(data), err
}

// removeLeftovers fails the test for every container still listed, and
// force-removes them so the leak checks that follow see only real leaks.
func (n *nerdctlEnv) removeLeftovers(t testing.TB) {
	t.Helper()
	if n.c.pid() == 0 {
		return
	}
	r := n.nerdctl(t, "ps", "-a", "-q", "--no-trunc")
	ids := strings.Fields(r.stdout)
	if len(ids) == 0 {
		return
	}
	t.Errorf("containers left at the end of the test (removing them): %v", ids)
	if r := n.nerdctl(t, append([]string{"rm", "-f"}, ids...)...); r.code != 0 {
		t.Errorf("nerdctl rm -f: exit %d: %s", r.code, r.stderr)
	}
}

// assertNamespaceClean fails the test if the namespace still holds an
// interface other than lo and nerdctl0 (a veth, a tap) or an iptables rule
// naming one of the test's containers, if CNI's host-wide state still
// names one of them, or if a port reserver is alive.
func (n *nerdctlEnv) assertNamespaceClean(t testing.TB) {
	t.Helper()
	out, err := runHost("ip", "-n", n.netns, "-o", "link", "show")
	if err != nil {
		t.Errorf("list links of %s: %v", n.netns, err)
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name != "lo" && name != "nerdctl0" {
			t.Errorf("leak: interface %s left in %s: %s", name, n.netns, l)
		}
	}
	rules := n.inNS(t, "iptables-save")
	for _, id := range n.c.ids {
		for _, l := range strings.Split(rules, "\n") {
			if strings.Contains(l, id) {
				t.Errorf("leak: iptables rule of %s left in %s: %s", id, n.netns, l)
			}
		}
		if hits := grepTree("/var/lib/cni", id); len(hits) > 0 {
			t.Errorf("leak: CNI state still names %s: %v", id, hits)
		}
		n.assertPortReserverGone(t, id)
	}
}

// assertPortReserverGone fails the test if the port reserver nerdctl's
// createRuntime hook started for id (a `sleep infinity` holding the
// published ports) is still alive, then removes its pid file's directory,
// which nerdctl leaves behind under runc too.
func (n *nerdctlEnv) assertPortReserverGone(t testing.TB, id string) {
	t.Helper()
	dir := filepath.Join("/run/nerdctl", testNamespace, id)
	defer os.RemoveAll(dir)
	data, err := os.ReadFile(filepath.Join(dir, "port-reserver.pid"))
	if err != nil {
		return
	}
	pid := strings.TrimSpace(string(data))
	if cmdline, err := os.ReadFile("/proc/" + pid + "/cmdline"); err == nil && strings.HasPrefix(string(cmdline), "sleep\x00infinity") {
		t.Errorf("leak: port reserver pid %s of %s still alive", pid, id)
	}
}

// grepTree returns the paths under dir whose name or content holds s.
func grepTree(dir, s string) []string {
	var hits []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if strings.Contains(p, s) {
			hits = append(hits, p)
			return nil
		}
		if d.Type().IsRegular() {
			if data, err := os.ReadFile(p); err == nil && strings.Contains(string(data), s) {
				hits = append(hits, p)
			}
		}
		return nil
	})
	return hits
}

// hostNet is what the host's own namespace holds that nerdctl could leak:
// interface names and iptables rules.
type hostNet struct {
	links, rules []string
}

// hostNetSnapshot reads the host namespace's interfaces and rules.
func hostNetSnapshot(t testing.TB) hostNet {
	t.Helper()
	var h hostNet
	for _, l := range strings.Split(mustHost(t, "ip", "-o", "link", "show"), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			h.links = append(h.links, name)
		}
	}
	h.rules = strings.Split(mustHost(t, "iptables-save"), "\n")
	return h
}

// assertHostUntouched fails the test if the host's namespace gained a
// bridge, veth or tap, or a CNI or nerdctl rule, since before.
func (n *nerdctlEnv) assertHostUntouched(t testing.TB, before hostNet) {
	t.Helper()
	after := hostNetSnapshot(t)
	for _, l := range after.links {
		if !slices.Contains(before.links, l) && (strings.HasPrefix(l, "nerdctl") || strings.HasPrefix(l, "veth") || strings.HasPrefix(l, "blxtap")) {
			t.Errorf("leak: interface %s appeared in the host's network namespace", l)
		}
	}
	for _, r := range after.rules {
		if !slices.Contains(before.rules, r) && (strings.Contains(r, "CNI") || strings.Contains(r, "nerdctl") || strings.Contains(r, "10.4.0.")) {
			t.Errorf("leak: iptables rule appeared in the host's network namespace: %s", r)
		}
	}
}

// stepTimes records the wall time of each step under each runtime.
type stepTimes struct {
	mu    sync.Mutex
	steps []string
	d     map[string]map[string]time.Duration
}

func (s *stepTimes) add(step, rt string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.d == nil {
		s.d = map[string]map[string]time.Duration{}
	}
	if s.d[step] == nil {
		s.d[step] = map[string]time.Duration{}
		s.steps = append(s.steps, step)
	}
	s.d[step][rt] = d
}

// log logs one line per step: runc's and boxlite's wall times.
func (s *stepTimes) log(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "wall times (runc / boxlite):")
	for _, step := range s.steps {
		fmt.Fprintf(&b, "\n  %-34s %8s / %8s", step, fmtDur(s.d[step][runcRuntime]), fmtDur(s.d[step][boxliteRuntime]))
	}
	t.Log(b.String())
}

func fmtDur(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return d.Round(time.Millisecond).String()
}
