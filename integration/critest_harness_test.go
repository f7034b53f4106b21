package integration

// The CRI harness: every TestCritest* test runs cri-tools' validation suite
// (critest, built by scripts/build-critest.sh) against a private containerd
// with its CRI plugins on. The daemon runs in a network namespace the test
// made (as the nerdctl harness does) and in an IPC namespace of its own;
// critest runs in both too. So the CNI bridge, its iptables chains, the
// host ports critest maps (12000-12003), host-network pods and the System V
// segment critest's host-IPC spec makes with ipcmk all live in namespaces
// that go with the test, and the host's are never touched.
//
// Images come from a registry of the test's own (critest_registry_test.go)
// serving scripts/critest-images.sh's tarball; containerd reaches it through
// hosts.toml files for registry.k8s.io, gcr.io and k8s.gcr.io. CNI is
// Debian's plugins (/usr/lib/cni): a bridge with host-local IPAM (its state
// under the daemon's directory) and portmap.
//
// At cleanup, in order: pods left by critest are removed (and fail the
// test); the containerd leak check (shims, QEMU, zombies, critest and
// ginkgo processes, mounts, shim state of every CRI container); the
// namespace holds no veth and no per-pod CNI chain (CNI DEL ran for every
// pod); the namespace (bridge, portmap's chains and jump rules) is deleted
// and gone; the host gained no /var/run/netns/cni-* namespace, no CNI
// result cache entry of the test's network, no interface and no CNI rule.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/typeurl/v2"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// Names of the CRI harness.
const (
	// criNamespace is the containerd namespace CRI works in.
	criNamespace = "k8s.io"
	// criSandboxImage is the pinned pod sandbox image; it must be one of
	// cmd/boxlite-mkimage/critest.go's images (its sandboxImage).
	criSandboxImage = "registry.k8s.io/pause:3.10.2"
	// criSubnet is the pods' subnet (inside the test's namespace).
	criSubnet = "10.203.0.0/16"
	// criBridge is the CNI bridge, in the test's namespace.
	criBridge = "bxcri0"
)

// critestBinDir builds (or finds in the cache) critest, crictl and ginkgo
// once per test binary.
var critestBinDir = scriptOutput("build-critest.sh", "--print-dir", "critest", 15*time.Minute)

// critestImages builds (or finds in the cache) the critest images'
// tarball once per test binary.
var critestImages = scriptOutput("critest-images.sh", "--print-path", "the critest images", 10*time.Minute)

// criSeq numbers the CRI environments of this test binary.
var criSeq atomic.Uint32

// criEnv is a private containerd with CRI in namespaces of the test.
type criEnv struct {
	c *containerd
	// netns is the network namespace's name under /var/run/netns; nsPath
	// its path.
	netns, nsPath string
	// bin holds critest, crictl and ginkgo.
	bin string
	// network is the CNI network's name (unique on the machine: CNI's
	// result cache in /var/lib/cni is shared).
	network string
	// reg is the test's registry.
	reg *layoutRegistry
}

// startCRI makes the test's namespaces, starts containerd with CRI there,
// the registry and the CNI config, waits for CRI to report its network
// ready and registers the cleanup checks (see the file comment).
func startCRI(t testing.TB) *criEnv {
	t.Helper()
	bin, err := critestBinDir()
	if err != nil {
		t.Fatal(err)
	}
	tarball, err := critestImages()
	if err != nil {
		t.Fatal(err)
	}
	for _, tool := range []string{"iptables-save", "nsenter", "ipcmk"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run make setup", tool)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/portmap"); err != nil {
		t.Fatal("CNI plugins missing in /usr/lib/cni: run make setup (containernetworking-plugins)")
	}
	n := criSeq.Add(1)
	e := &criEnv{bin: bin, netns: fmt.Sprintf("bxc%d-%d", os.Getpid(), n), network: fmt.Sprintf("bxcri-%d-%d", os.Getpid(), n)}
	e.nsPath = filepath.Join("/var/run/netns", e.netns)
	hostBefore := hostNetSnapshot(t)
	podNSBefore := cniNetnsList()
	mustHost(t, "ip", "netns", "add", e.netns)
	t.Cleanup(func() { e.deleteNamespace(t, hostBefore, podNSBefore) })
	mustHost(t, "ip", "-n", e.netns, "link", "set", "lo", "up")
	// Runs after the containerd leak check: every pod is gone by then.
	t.Cleanup(func() { e.assertNamespaceClean(t) })
	e.c = startContainerd(t, inNetNS(e.nsPath), inNewIPCNamespace(), withCRI(criConfig))
	e.reg = serveRegistry(t, tarball, e.nsPath, filepath.Join(e.c.dir, "certs.d"))
	for _, d := range []string{"net.d", "tmp", "critest"} {
		if err := os.MkdirAll(filepath.Join(e.c.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(e.c.dir, "net.d", "10-bxcri.conflist"), cniConfList(e.network, filepath.Join(e.c.dir, "cni-ipam")))
	writeFile(t, filepath.Join(e.c.dir, "crictl.yaml"), fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", e.c.addr, e.c.addr))
	e.recordCRIContainers(t)
	t.Cleanup(func() { e.removeLeftovers(t) })
	e.waitNetworkReady(t)
	return e
}

// criConfig is the CRI part of the daemon's config, every path under dir:
// runtime handlers runc and boxlite (the shim in bin/, which finds the
// guest kernel and initramfs next to itself), both with the pod sandbox
// controller; registry hosts under certs.d; CNI from /usr/lib/cni with
// net.d's conflist; NRI's socket there too, and no NRI plugins of the
// host's. restrict_oom_score_adj: these machines lack CAP_SYS_RESOURCE.
func criConfig(dir string) string {
	return fmt.Sprintf(`
[plugins.'io.containerd.nri.v1.nri']
  socket_path = %[8]q
  plugin_path = %[9]q
  plugin_config_path = %[9]q

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %[1]q

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = %[2]q

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['/usr/lib/cni']
  conf_dir = %[3]q

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = 'runc'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = %[4]q
  sandboxer = 'podsandbox'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  Root = %[5]q

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.boxlite]
  runtime_type = %[6]q
  runtime_path = %[7]q
  sandboxer = 'podsandbox'
  pod_annotations = ['io.boxlite.*']
  container_annotations = ['io.boxlite.*']
`, criSandboxImage, filepath.Join(dir, "certs.d"), filepath.Join(dir, "net.d"), runcRuntime,
		filepath.Join(dir, "runc"), boxliteRuntime, filepath.Join(repoRoot, "bin", shimBinary),
		filepath.Join(dir, "nri.sock"), filepath.Join(dir, "nri"))
}

// nriSocket is NRI's socket in the daemon's directory (criConfig), which
// critest's NRI specs connect their plugins to.
func (e *criEnv) nriSocket() string { return filepath.Join(e.c.dir, "nri.sock") }

// cniConfList is the pods' network: a bridge (gateway, no masquerading:
// nothing leaves the namespace) with host-local IPAM keeping its state in
// ipamDir, and portmap for host ports.
func cniConfList(network, ipamDir string) string {
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       network,
		"plugins": []map[string]any{
			{
				"type": "bridge", "bridge": criBridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
				"ipam": map[string]any{
					"type": "host-local", "dataDir": ipamDir,
					"ranges": [][]map[string]string{{{"subnet": criSubnet}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
			{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	data, _ := json.MarshalIndent(conf, "", "  ")
	return string(data)
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// crictl runs crictl against the daemon and returns its stdout. It runs in
// the test's network namespace, where the daemon's streaming server (exec,
// attach) listens.
func (e *criEnv) crictl(args ...string) (string, error) {
	full := append([]string{"--config", filepath.Join(e.c.dir, "crictl.yaml")}, args...)
	return e.inNS(filepath.Join(e.bin, "crictl"), full...)
}

// waitNetworkReady waits until CRI reports its network ready (it has
// loaded the conflist).
func (e *criEnv) waitNetworkReady(t testing.TB) {
	t.Helper()
	var last string
	ready := func() bool {
		out, err := e.crictl("info")
		if err != nil {
			last = err.Error()
			return false
		}
		var info struct {
			Status struct {
				Conditions []struct {
					Type   string `json:"type"`
					Status bool   `json:"status"`
				} `json:"conditions"`
			} `json:"status"`
		}
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			last = err.Error()
			return false
		}
		for _, c := range info.Status.Conditions {
			if c.Type == "NetworkReady" && c.Status {
				return true
			}
		}
		last = out
		return false
	}
	deadline := time.Now().Add(30 * time.Second)
	for !ready() {
		if time.Now().After(deadline) {
			t.Fatalf("CRI network not ready within 30s: %s", last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// recordCRIContainers records every container created in criNamespace
// (pause containers included) for the shim state check, until cleanup.
func (e *criEnv) recordCRIContainers(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch, errs := e.c.goClient(t).Subscribe(ctx, `namespace==`+criNamespace+`,topic=="/containers/create"`)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case env := <-ch:
				if env == nil || env.Event == nil {
					continue
				}
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				if ev, ok := v.(*eventstypes.ContainerCreate); ok {
					e.c.mu.Lock()
					e.c.criIDs = append(e.c.criIDs, ev.ID)
					e.c.mu.Unlock()
				}
			case <-errs:
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// removeLeftovers fails the test for every pod or container CRI still
// lists, and removes them so the leak checks that follow see only real
// leaks.
func (e *criEnv) removeLeftovers(t testing.TB) {
	t.Helper()
	if e.c.pid() == 0 {
		return
	}
	for _, kind := range []struct{ list, rm string }{{"pods", "rmp"}, {"ps", "rm"}} {
		// Both list every state with -q alone for pods, -a for containers.
		args := []string{kind.list, "-q"}
		if kind.list == "ps" {
			args = append(args, "-a")
		}
		out, err := e.crictl(args...)
		if err != nil {
			t.Errorf("crictl %s: %v", kind.list, err)
			continue
		}
		ids := strings.Fields(out)
		if len(ids) == 0 {
			continue
		}
		t.Errorf("CRI %s left at the end of the test (removing them): %v", kind.list, ids)
		if _, err := e.crictl(append([]string{kind.rm, "-f"}, ids...)...); err != nil {
			t.Errorf("crictl %s -f: %v", kind.rm, err)
		}
	}
}

// inNS runs a short command inside the test's network namespace and
// returns its stdout.
func (e *criEnv) inNS(name string, args ...string) (string, error) {
	var out, errb syncBuffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	p, err := startInNetNS(e.nsPath, cmd)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	x, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		return "", fmt.Errorf("%s %v: %w", name, args, err)
	}
	if x.Status != 0 {
		return out.String(), fmt.Errorf("%s %v: %v: %s", name, args, x, errb.String())
	}
	return out.String(), nil
}

// portmapChains are the chains portmap makes once and never removes, with
// their jumps and (but for the DNAT chain's) their rules; every other CNI
// chain or rule belongs to one pod.
var portmapChains = []string{"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"}

// assertNamespaceClean fails the test if the namespace still holds a veth
// (or anything but lo and the bridge) or a per-pod CNI chain or rule: CNI
// DEL did not run for some pod.
func (e *criEnv) assertNamespaceClean(t testing.TB) {
	t.Helper()
	out, err := runHost("ip", "-n", e.netns, "-o", "link", "show")
	if err != nil {
		t.Errorf("list links of %s: %v", e.netns, err)
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name != "lo" && name != criBridge {
			t.Errorf("leak: interface %s left in %s: %s", name, e.netns, l)
		}
	}
	rules, err := e.inNS("iptables-save")
	if err != nil {
		t.Errorf("iptables-save in %s: %v", e.netns, err)
	}
	for _, l := range strings.Split(rules, "\n") {
		if !strings.Contains(l, "CNI-") {
			continue
		}
		portmap := false
		for _, c := range portmapChains {
			// The chain itself, a jump to it, or one of the chain's own
			// rules (the DNAT chain's are jumps to per-pod chains).
			if strings.HasPrefix(l, ":"+c+" ") || strings.HasSuffix(l, "-j "+c) ||
				(strings.HasPrefix(l, "-A "+c+" ") && c != "CNI-HOSTPORT-DNAT") {
				portmap = true
			}
		}
		if !portmap {
			t.Errorf("leak: per-pod CNI rule left in %s: %s", e.netns, l)
		}
	}
}

// deleteNamespace deletes the test's network namespace (the bridge and
// portmap's chains go with it) and fails the test if the host gained a pod
// network namespace, a CNI result of the test's network, an interface or
// a CNI rule since before; leftovers are removed.
func (e *criEnv) deleteNamespace(t testing.TB, before hostNet, podNSBefore []string) {
	t.Helper()
	if _, err := runHost("ip", "netns", "del", e.netns); err != nil {
		t.Errorf("delete network namespace %s: %v", e.netns, err)
	}
	if dirExists(e.nsPath) {
		t.Errorf("network namespace %s still there after ip netns del", e.nsPath)
	}
	for _, ns := range cniNetnsList() {
		if !slices.Contains(podNSBefore, ns) {
			t.Errorf("leak: pod network namespace %s left (removed now)", ns)
			syscall.Unmount(ns, syscall.MNT_DETACH)
			os.Remove(ns)
		}
	}
	results, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", e.network+"-*"))
	for _, r := range results {
		t.Errorf("leak: CNI result cache entry %s left (removed now)", r)
		os.Remove(r)
	}
	after := hostNetSnapshot(t)
	for _, l := range after.links {
		if !slices.Contains(before.links, l) && (l == criBridge || strings.HasPrefix(l, "veth")) {
			t.Errorf("leak: interface %s appeared in the host's network namespace", l)
		}
	}
	for _, r := range after.rules {
		if !slices.Contains(before.rules, r) && strings.Contains(r, "CNI-") {
			t.Errorf("leak: CNI rule appeared in the host's network namespace: %s", r)
		}
	}
}

// cniNetnsList lists the pod network namespaces CRI makes by default
// (/var/run/netns/cni-*).
func cniNetnsList() []string {
	m, _ := filepath.Glob("/var/run/netns/cni-*")
	return m
}

// startCritest starts critest args in the test's network namespace and the
// daemon's IPC namespace (through nsenter, which execs it), in a process
// group of its own (critest -parallel runs ginkgo, which runs critest
// nodes), with its temporary files under the daemon's directory and its
// output in logPath.
func (e *criEnv) startCritest(t testing.TB, logPath string, args ...string) *reaper.Process {
	t.Helper()
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	ipc := fmt.Sprintf("/proc/%d/ns/ipc", e.c.pid())
	cmd := exec.Command("nsenter", append([]string{"--ipc=" + ipc, "--", filepath.Join(e.bin, "critest")}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+e.bin+":"+os.Getenv("PATH"), "TMPDIR="+filepath.Join(e.c.dir, "tmp"))
	cmd.Dir = filepath.Join(e.c.dir, "critest")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p, err := startInNetNS(e.nsPath, cmd)
	if err != nil {
		t.Fatalf("start critest: %v", err)
	}
	return p
}
