package integration

// The containerd harness: every TestContainerd* test starts a private
// containerd 2.4 (its own root, state, sockets and shim socket directory
// under a short temporary directory; no config imports; CRI off), imports the
// project's offline busybox image, drives it with ctr and the Go client, and
// ends by asserting that no shim, QEMU or zombie it caused is left and that
// nothing stays mounted under its directories. containerd is started and
// stopped by pid through pkg/reaper, never by name.
//
// Process ancestry here: containerd does not make itself a child subreaper,
// so a shim that daemonizes (its "start" action exits) is reparented to the
// nearest subreaper, this test binary (reaper.Default). QEMU is the shim's
// child (with Pdeathsig). The leak check therefore looks at every
// descendant of the test process, and at any process whose command line
// names the test's directory (shims carry the containerd address, QEMU the
// bundle's rootfs), zombies included.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Names the containerd tests use.
const (
	// boxliteRuntime and runcRuntime are the runtimes under test.
	boxliteRuntime = "io.containerd.boxlite.v1"
	runcRuntime    = "io.containerd.runc.v2"
	// testImage runs sh by default; noCmdImage has no Cmd or Entrypoint.
	testImage  = "docker.io/boxlite/busybox:test"
	noCmdImage = "docker.io/boxlite/nocmd:test"
	// testNamespace is the containerd namespace of every test.
	testNamespace = "boxlite-test"
	// shimBinary is the shim's file name, found on containerd's PATH.
	shimBinary = "containerd-shim-boxlite-v1"
	// shimStateRoot is where the shim keeps each box's VM state
	// (pkg/shim's stateRoot); a box's directory is derived from its
	// namespace and id.
	shimStateRoot = "/run/boxlite/shim"
	// ctrTimeout bounds one ctr command (a box boots in about 2 s).
	ctrTimeout = 3 * time.Minute
	// settleTimeout bounds how long shims and VMMs may take to exit after
	// their task was deleted before they count as leaked.
	settleTimeout = 20 * time.Second
)

// cgroupV1Warning is a line ctr prints on stderr on hybrid-cgroup hosts.
const cgroupV1Warning = "The support for cgroup v1 is deprecated"

// scriptOutput returns a getter, run once per test binary, of the path a
// builder in scripts/ prints last: it builds the artifact or finds it in
// the cache.
func scriptOutput(script, flag, what string, timeout time.Duration) func() (string, error) {
	return sync.OnceValues(func() (string, error) {
		out, err := runHostTimeout(timeout, "bash", filepath.Join(repoRoot, "scripts", script), flag)
		if err != nil {
			return "", fmt.Errorf("build %s: %w", what, err)
		}
		return lastLine(out), nil
	})
}

// containerdBinDir builds (or finds in the cache) containerd, ctr and the runc
// shim once per test binary with scripts/build-containerd.sh.
var containerdBinDir = scriptOutput("build-containerd.sh", "--print-dir", "containerd", 15*time.Minute)

// imageTarball builds (or finds in the cache) the OCI image-layout tarball
// with testImage and noCmdImage, once per test binary.
var imageTarball = scriptOutput("oci-image.sh", "--print-path", "the busybox OCI image", 5*time.Minute)

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// runHostTimeout is runHost with a caller's bound.
func runHostTimeout(d time.Duration, name string, args ...string) (string, error) {
	return runHostEnv(d, nil, name, args...)
}

// runHostEnv is runHostTimeout with env added to this process's
// environment.
func runHostEnv(d time.Duration, env []string, name string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = &out, &errb
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		return "", fmt.Errorf("%s %v: %w: %s", name, args, err, errb.String())
	}
	if e.Status != 0 {
		return out.String(), fmt.Errorf("%s %v: %v: %s", name, args, e, errb.String())
	}
	return out.String(), nil
}

// containerd is one private containerd daemon for one test.
type containerd struct {
	// dir holds everything of this daemon: config, root, state, sockets,
	// its log. Short, so socket paths fit.
	dir string
	// addr is the gRPC socket; ctr needs it absolute.
	addr string
	// bin holds containerd, ctr and containerd-shim-runc-v2.
	bin string
	// config is the daemon's config file.
	config string
	// logPath receives the daemon's (and its shims') log.
	logPath string
	// netnsPath, if set, is the network namespace the daemon (and so its
	// shims, their VMMs and the hooks they run) is started in.
	netnsPath string
	// criConfig, if set, enables the CRI plugins; what it returns for the
	// daemon's directory is appended to the config (their sections).
	criConfig func(dir string) string
	// cloneflags are namespaces the daemon gets new ones of
	// (syscall.CLONE_NEW*).
	cloneflags uintptr

	// mu guards proc, client and criIDs.
	mu sync.Mutex
	// proc is the running daemon, nil while stopped. Guarded by mu.
	proc *reaper.Process
	// client is a Go client connected to the daemon. Guarded by mu.
	client *client.Client
	// criIDs are the containers (pause containers included) made through
	// CRI, in criNamespace, for the shim state check. Guarded by mu.
	criIDs []string

	// ids are the container ids the test used, for the state-dir check.
	ids []string
}

// containerdOption configures startContainerd.
type containerdOption func(*containerd)

// inNetNS starts the daemon in the network namespace at path (only that
// namespace: its mounts stay ours, so the leak check sees them). Shims,
// their VMMs and the OCI hooks they run inherit it.
func inNetNS(path string) containerdOption {
	return func(c *containerd) { c.netnsPath = path }
}

// withCRI enables containerd's CRI plugins (the CRI service, its image and
// runtime services, the pod sandbox controller) and NRI, and
// appends config(dir), TOML for their sections with paths under the
// daemon's directory, to the daemon's config.
func withCRI(config func(dir string) string) containerdOption {
	return func(c *containerd) { c.criConfig = config }
}

// inNewIPCNamespace starts the daemon in an IPC namespace of its own: its
// shims and host-IPC containers share it, and System V objects made in it
// go with its last process.
func inNewIPCNamespace() containerdOption {
	return func(c *containerd) { c.cloneflags |= syscall.CLONE_NEWIPC }
}

// startContainerd starts a private containerd, imports the test images and
// registers its stop and the leak assertion as the test's cleanup.
func startContainerd(t testing.TB, opts ...containerdOption) *containerd {
	t.Helper()
	if _, err := os.Stat(filepath.Join(repoRoot, "bin", shimBinary)); err != nil {
		t.Fatalf("%s missing: run make build", filepath.Join(repoRoot, "bin", shimBinary))
	}
	bin, err := containerdBinDir()
	if err != nil {
		t.Fatal(err)
	}
	tarball, err := imageTarball()
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	c := &containerd{
		dir: dir, addr: filepath.Join(dir, "c.sock"), bin: bin,
		config: filepath.Join(dir, "config.toml"), logPath: filepath.Join(dir, "containerd.log"),
	}
	for _, o := range opts {
		o(c)
	}
	config := containerdConfig(dir, c.criConfig != nil)
	if c.criConfig != nil {
		config += c.criConfig(dir)
	}
	if os.Getenv("BOXLITE_CONTAINERD_DEBUG") != "" {
		// Shims log at debug level too: containerd passes its level on.
		config += "\n[debug]\n  level = \"debug\"\n"
	}
	if err := os.WriteFile(c.config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.assertNoLeaks(t)
		if t.Failed() {
			c.dumpLog(t)
		}
	})
	c.start(t)
	if r := c.ctr(t, "images", "import", "--platform", "linux/amd64", tarball); r.code != 0 {
		t.Fatalf("import %s: exit %d: %s", tarball, r.code, r.stderr)
	}
	return c
}

// criPlugins are the plugins CRI needs, and NRI, which CRI drives: off
// unless withCRI.
var criPlugins = []string{
	"io.containerd.grpc.v1.cri",
	"io.containerd.cri.v1.images",
	"io.containerd.cri.v1.runtime",
	"io.containerd.podsandbox.controller.v1.podsandbox",
	"io.containerd.nri.v1.nri",
}

// containerdConfig is the daemon's config (version 4, containerd 2.4): no
// imports, unused snapshotters off, CRI and NRI off unless cri, every path
// under dir.
func containerdConfig(dir string, cri bool) string {
	disabled := ""
	if !cri {
		disabled = "  \"" + strings.Join(criPlugins, "\",\n  \"") + "\",\n"
	}
	return fmt.Sprintf(`version = 4
root = %[1]q
state = %[2]q
imports = []
disabled_plugins = [
%[6]s  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.mount-handler.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[plugins.'io.containerd.server.v1.grpc']
  address = %[3]q

[plugins.'io.containerd.server.v1.ttrpc']
  address = %[4]q

[plugins.'io.containerd.server.v1.debug']
  address = ""

[plugins.'io.containerd.server.v1.metrics']
  address = ""

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = %[5]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), filepath.Join(dir, "c.sock"),
		filepath.Join(dir, "c.sock.ttrpc"), filepath.Join(dir, "s"), disabled)
}

// start starts the daemon and waits until it answers.
func (c *containerd) start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(c.bin, "containerd"), "--config", c.config)
	// containerd looks shims up on its PATH: our shim first, then the
	// cached runc shim, then the host's runc.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Join(repoRoot, "bin")+":"+c.bin+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.dir
	if c.cloneflags != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: c.cloneflags}
	}
	p, err := startInNetNS(c.netnsPath, cmd)
	if err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	c.mu.Lock()
	c.proc = p
	c.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		cl, err := client.New(c.addr, client.WithDefaultNamespace(testNamespace), client.WithTimeout(time.Second))
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = cl.Version(ctx)
			cancel()
			if err == nil {
				c.mu.Lock()
				c.client = cl
				c.mu.Unlock()
				return
			}
			cl.Close()
		}
		select {
		case <-p.Done():
			e, _ := p.Exit()
			c.dumpLog(t)
			t.Fatalf("containerd exited before it was ready: %v", e)
		default:
		}
		if time.Now().After(deadline) {
			c.dumpLog(t)
			t.Fatalf("containerd not ready within 30s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startInNetNS starts cmd through the reaper from a thread inside the
// network namespace at nsPath ("" for ours); only the network namespace
// changes, unlike `ip netns exec`, which also makes a mount namespace.
func startInNetNS(nsPath string, cmd *exec.Cmd) (*reaper.Process, error) {
	if nsPath == "" {
		return reaper.Default().Start(cmd)
	}
	ns, err := netns.Open(nsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	var p *reaper.Process
	err = netns.Do(ns, func() error {
		var err error
		p, err = reaper.Default().Start(cmd)
		return err
	})
	return p, err
}

// stop stops the daemon by pid: SIGTERM, then SIGKILL after 15 s. Shims keep
// running, as with a real daemon restart.
func (c *containerd) stop(t testing.TB) {
	t.Helper()
	c.stopWith(t, syscall.SIGTERM)
}

// stopWith stops the daemon by pid with sig (SIGTERM: a restart; SIGKILL: a
// crash), then SIGKILL if it is not gone 15 s later. Shims keep running.
func (c *containerd) stopWith(t testing.TB, sig syscall.Signal) {
	t.Helper()
	c.mu.Lock()
	p, cl := c.proc, c.client
	c.proc, c.client = nil, nil
	c.mu.Unlock()
	if cl != nil {
		cl.Close()
	}
	if p == nil {
		return
	}
	p.Signal(sig)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := p.Wait(ctx); err != nil {
		t.Errorf("containerd pid %d not gone 15s after %v: killing it", p.Pid(), sig)
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
	}
}

// pid is the running daemon's pid, or 0.
func (c *containerd) pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return 0
	}
	return c.proc.Pid()
}

// goClient is the Go client of the running daemon.
func (c *containerd) goClient(t testing.TB) *client.Client {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.client == nil {
		t.Fatal("containerd is not running")
	}
	return c.client
}

// nsCtx is a context in the test namespace.
func nsCtx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, testNamespace)
}

// dumpLog logs the tail of the daemon's log.
func (c *containerd) dumpLog(t testing.TB) {
	t.Helper()
	data, err := os.ReadFile(c.logPath)
	if err != nil {
		return
	}
	var keep []string
	for _, l := range strings.Split(string(data), "\n") {
		if !strings.Contains(l, "loading plugin") && !strings.Contains(l, "fsverity") {
			keep = append(keep, l)
		}
	}
	if dir := os.Getenv("BOXLITE_KEEP_LOGS"); dir != "" {
		// The whole log, for a failure the tail does not explain.
		keptPath := filepath.Join(dir, filepath.Base(c.dir)+"-containerd.log")
		if err := os.WriteFile(keptPath, data, 0o644); err == nil {
			t.Logf("containerd log kept in %s", keptPath)
		}
	}
	if len(keep) > 80 {
		keep = keep[len(keep)-80:]
	}
	t.Logf("containerd log (tail, BOXLITE_KEEP_LOGS=DIR keeps it all):\n%s", strings.Join(keep, "\n"))
}

// idSeq numbers container ids within this test binary.
var idSeq atomic.Uint64

// newID returns a container id unique on this machine (the test binary's pid
// and a sequence number: the shim's state directory is derived from it) and
// records it for the leak check.
func (c *containerd) newID(t testing.TB, prefix string) string {
	t.Helper()
	id := fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), idSeq.Add(1))
	c.ids = append(c.ids, id)
	return id
}
