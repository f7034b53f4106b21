package integration

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// netProbe prints what the tests check of a box's network: eth0's address
// line, its link line (MAC, MTU), the default route, a ping of the peer and
// a reply from its server.
func netProbe(peer string, port int) string {
	return fmt.Sprintf("ip -o -4 addr show eth0; ip -o link show eth0; ip route show default; ping -c 1 -W 10 %s >/dev/null && echo ping-ok; nc %s %d", peer, peer, port)
}

// checkNetProbe checks netProbe's output against the test network.
func checkNetProbe(t testing.TB, tn *testNet, mac, out string) {
	t.Helper()
	for _, want := range []string{
		"inet " + tn.addr + "/24", "link/ether " + mac, fmt.Sprintf("mtu %d", tn.mtu),
		"default via " + tn.peerAddr, "ping-ok", "hello-from-peer",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("box network: missing %q in:\n%s", want, out)
		}
	}
}

// TestContainerdBoxJoinsTheNetworkNamespaceItIsGiven runs a box with ctr
// --with-ns network:PATH in a namespace wired by hand (a veth with an
// address, a route and an MTU of 1400, its peer on a bridge): the box has
// the veth's address, MAC and MTU, pings the gateway across the bridge and
// gets an answer from a server there; it serves one itself, reached
// through a port published with DNAT on the bridge's side; the VMM (the
// task's pid) is in that namespace; and once the box is gone no tap or
// redirect is left in it.
func TestContainerdBoxJoinsTheNetworkNamespaceItIsGiven(t *testing.T) {
	c := startContainerd(t)
	tn := newTestNet(t)
	tn.wire(t)
	tn.serve(t, 9000, "hello-from-peer")
	mac := tn.mac(t)
	logf := filepath.Join(c.dir, "probe.log")
	id := c.runDetached(t, boxliteRuntime, []string{"--with-ns", "network:" + tn.boxPath, "--log-uri", "file://" + logf},
		"sh", "-c", netProbe(tn.peerAddr, 9000)+"; echo probe-done; echo served-by-the-box > /tmp/index.html; httpd -f -p 8080 -h /tmp")
	// The task's pid (the VMM) lives in the box's namespace, which is
	// what CRI, nerdctl's hooks and ctr --cni rely on.
	pid := c.taskPid(t, id)
	vmmNS, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	st, err := os.Stat(tn.boxPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("net:[%d]", st.Sys().(*syscall.Stat_t).Ino); vmmNS != want {
		t.Errorf("task pid %d is in %s, want the box's namespace %s", pid, vmmNS, want)
	}
	var out string
	waitFor(t, time.Minute, "the probe's output", func() bool {
		data, _ := os.ReadFile(logf)
		out = string(data)
		return strings.Contains(out, "probe-done")
	})
	checkNetProbe(t, tn, mac, out)
	addr := tn.publish(t, 18080, 8080)
	var got string
	waitFor(t, time.Minute, "the box's server through the published port", func() bool {
		conn, err := dialIn("/var/run/netns/"+tn.peer, addr, 5*time.Second)
		if err != nil {
			return false
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET /index.html HTTP/1.0\r\n\r\n")
		data, _ := io.ReadAll(conn)
		got = string(data)
		return strings.Contains(got, "served-by-the-box")
	})
	c.killAndDelete(t, id)
	tn.assertUnwired(t)
}

// TestContainerdLateNetworkIsWiredAtStart creates the task in an empty
// network namespace and only then adds the veth and its addresses, as ctr
// --cni and nerdctl's createRuntime hook do: the box, started afterwards,
// has the address and reaches the peer.
func TestContainerdLateNetworkIsWiredAtStart(t *testing.T) {
	c := startContainerd(t)
	tn := newTestNet(t)
	tn.serve(t, 9001, "hello-from-peer")
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainerWith(t, id, []oci.SpecOpts{
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: tn.boxPath}),
	}, "sh", "-c", netProbe(tn.peerAddr, 9001))
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	logf := filepath.Join(c.dir, id+".log")
	task, err := ctr.NewTask(ctx, cio.LogFile(logf))
	if err != nil {
		t.Fatalf("new task: %v", err)
	}
	c.cleanupTask(t, task)
	tn.wire(t)
	mac := tn.mac(t)
	code := startAndWait(t, task)
	out, _ := os.ReadFile(logf)
	if code != 0 {
		t.Errorf("exit %d, output:\n%s", code, out)
	}
	checkNetProbe(t, tn, mac, string(out))
	c.deleteTask(t, task)
	tn.assertUnwired(t)
}

// TestContainerdEmptyNetworkNamespaceStartsWithLoopbackOnly starts a box
// whose namespace never gets an interface: it runs with lo only (its NIC
// stays in the VM's root namespace), instead of failing or hanging.
func TestContainerdEmptyNetworkNamespaceStartsWithLoopbackOnly(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, nil, "sh", "-c", "ls /sys/class/net")
	if r.code != 0 || strings.Fields(r.stdout)[0] != "lo" || len(strings.Fields(r.stdout)) != 1 {
		t.Errorf("box without a network: exit %d, interfaces %q, want only lo (stderr %q)", r.code, r.stdout, r.stderr)
	}
}

// TestContainerdHostNetworkIsRefused runs ctr --net-host: a VM cannot share
// the host's network stack, so create fails with a message saying so, and
// nothing is left.
func TestContainerdHostNetworkIsRefused(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, []string{"--net-host"}, "true")
	if r.code == 0 || !strings.Contains(r.stderr, "host's network") {
		t.Errorf("--net-host: exit %d stderr %q, want an error about the host's network", r.code, r.stderr)
	}
}

// TestContainerdHooksRunOnTheHost gives a box a createRuntime hook that
// saves its stdin and the namespace it can see through the state's pid, a
// poststart and a poststop hook: each runs on the host with the OCI state
// (the box's id, bundle and annotations, the VMM's pid, whose network
// namespace is the box's), in order, and the guest never sees them.
func TestContainerdHooksRunOnTheHost(t *testing.T) {
	c := startContainerd(t)
	dir := shortTempDir(t)
	hook := filepath.Join(dir, "hook.sh")
	// $1 names the kind; the state goes to <kind>.json, the VMM's
	// network namespace to <kind>.netns.
	script := "#!/bin/sh\nset -e\ncat > " + dir + "/$1.json\npid=$(sed 's/.*\"pid\":\\([0-9]*\\).*/\\1/' " + dir + "/$1.json)\nreadlink /proc/$pid/ns/net > " + dir + "/$1.netns || true\necho $1 >> " + dir + "/order\n"
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	mk := func(kind string) specs.Hook { return specs.Hook{Path: hook, Args: []string{"hook.sh", kind}} }
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainerWith(t, id, []oci.SpecOpts{
		oci.WithAnnotations(map[string]string{"test.boxlite/hook": "yes"}),
		func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
			s.Hooks = &specs.Hooks{
				CreateRuntime: []specs.Hook{mk("createRuntime")},
				Poststart:     []specs.Hook{mk("poststart")},
				Poststop:      []specs.Hook{mk("poststop")},
			}
			return nil
		},
	}, "sh", "-c", "ls /proc/self/ns/ >/dev/null; echo ran")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatalf("new task: %v", err)
	}
	c.cleanupTask(t, task)
	vmmPid := int(task.Pid())
	vmmNS, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", vmmPid))
	if code := startAndWait(t, task); code != 0 {
		t.Errorf("exit %d", code)
	}
	c.deleteTask(t, task)
	order, _ := os.ReadFile(filepath.Join(dir, "order"))
	if got := strings.Fields(string(order)); strings.Join(got, " ") != "createRuntime poststart poststop" {
		t.Errorf("hooks ran in order %q, want createRuntime poststart poststop", got)
	}
	state, _ := os.ReadFile(filepath.Join(dir, "createRuntime.json"))
	for _, want := range []string{`"id":"` + id + `"`, fmt.Sprintf(`"pid":%d`, vmmPid), `"bundle":"`, `"test.boxlite/hook":"yes"`, `"status":"creating"`} {
		if !strings.Contains(string(state), want) {
			t.Errorf("createRuntime state lacks %s: %s", want, state)
		}
	}
	if ns, _ := os.ReadFile(filepath.Join(dir, "createRuntime.netns")); strings.TrimSpace(string(ns)) != vmmNS || vmmNS == "" {
		t.Errorf("createRuntime hook saw namespace %q through the state's pid, want the VMM's %q", ns, vmmNS)
	}
	if stop, _ := os.ReadFile(filepath.Join(dir, "poststop.json")); !strings.Contains(string(stop), `"status":"stopped"`) {
		t.Errorf("poststop state: %s", stop)
	}
}

// TestContainerdFailingHookFailsCreateAndLeavesNothing gives a box a
// createRuntime hook that fails: the task is not created, the error carries
// the hook's stderr, and no VMM, tap, mount or state is left (the
// containerd harness checks processes, mounts and state directories).
func TestContainerdFailingHookFailsCreateAndLeavesNothing(t *testing.T) {
	c := startContainerd(t)
	tn := newTestNet(t)
	tn.wire(t)
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainerWith(t, id, []oci.SpecOpts{
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: tn.boxPath}),
		func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
			s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{
				Path: "/bin/sh", Args: []string{"sh", "-c", "echo no network for you >&2; exit 3"},
			}}}
			return nil
		},
	}, "true")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err == nil {
		c.cleanupTask(t, task)
		t.Fatal("task created although its createRuntime hook failed")
	}
	if !strings.Contains(err.Error(), "no network for you") || !strings.Contains(err.Error(), "createRuntime") {
		t.Errorf("error %q does not carry the hook's stderr", err)
	}
	tn.assertUnwired(t)
}

// TestContainerdVolumesBehaveAsUnderRunc bind-mounts host paths into a box
// with ctr --mount, and the same into a runc container: a rw directory
// (writes show on the host at once, with the writer's ownership), a ro
// directory (a write fails with EROFS), and a single file.
func TestContainerdVolumesBehaveAsUnderRunc(t *testing.T) {
	c := startContainerd(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			dir := shortTempDir(t)
			rw, ro, file := filepath.Join(dir, "rw"), filepath.Join(dir, "ro"), filepath.Join(dir, "one.txt")
			for _, d := range []string{rw, ro} {
				os.MkdirAll(d, 0o777)
			}
			os.Chmod(rw, 0o777)
			os.WriteFile(filepath.Join(ro, "in.txt"), []byte("from the host\n"), 0o644)
			os.WriteFile(file, []byte("single file\n"), 0o644)
			script := "echo written > /rw/out.txt; cat /ro/in.txt; (echo x > /ro/new.txt) 2>&1 | grep -o 'Read-only file system'; cat /etc/one.txt"
			r := c.runRm(t, rt, []string{"--user", "1000:1000",
				"--mount", "type=bind,src=" + rw + ",dst=/rw,options=rbind:rw",
				"--mount", "type=bind,src=" + ro + ",dst=/ro,options=rbind:ro",
				"--mount", "type=bind,src=" + file + ",dst=/etc/one.txt,options=rbind:ro",
			}, "sh", "-c", script)
			if r.code != 0 {
				t.Fatalf("exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
			}
			for _, want := range []string{"from the host", "Read-only file system", "single file"} {
				if !strings.Contains(r.stdout, want) {
					t.Errorf("output lacks %q: %q", want, r.stdout)
				}
			}
			if got, _ := os.ReadFile(filepath.Join(rw, "out.txt")); string(got) != "written\n" {
				t.Errorf("host sees %q in the rw volume, want the box's write", got)
			}
			if _, err := os.Stat(filepath.Join(ro, "new.txt")); err == nil {
				t.Error("a write went through the ro volume")
			}
			if st, err := os.Stat(filepath.Join(rw, "out.txt")); err != nil {
				t.Errorf("file made by uid 1000 in the box: %v", err)
			} else if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 1000 {
				t.Errorf("file made by uid 1000 in the box is owned by uid %d on the host", uid)
			}
		})
	}
}

// TestContainerdMissingVolumeSourceFailsCleanly mounts a host path that
// does not exist: create fails with a message naming it, and nothing is
// left behind.
func TestContainerdMissingVolumeSourceFailsCleanly(t *testing.T) {
	c := startContainerd(t)
	missing := filepath.Join(shortTempDir(t), "no-such-dir")
	r := c.runRm(t, boxliteRuntime, []string{"--mount", "type=bind,src=" + missing + ",dst=/data,options=rbind:rw"}, "true")
	if r.code == 0 || !strings.Contains(r.stderr, missing) {
		t.Errorf("missing volume source: exit %d stderr %q, want an error naming %s", r.code, r.stderr, missing)
	}
	r = c.runRm(t, boxliteRuntime, []string{"--mount", "type=bind,src=/proc/self,dst=/hostproc,options=rbind:ro"}, "true")
	if r.code == 0 || !strings.Contains(r.stderr, "/proc") {
		t.Errorf("a volume from the host's /proc: exit %d stderr %q, want it refused", r.code, r.stderr)
	}
}

// newContainerWith creates a container of testImage running args under
// boxlite, with extra spec options.
func (c *containerd) newContainerWith(t testing.TB, id string, opts []oci.SpecOpts, args ...string) client.Container {
	t.Helper()
	ctx := nsCtx(context.Background())
	cl := c.goClient(t)
	img, err := cl.GetImage(ctx, testImage)
	if err != nil {
		t.Fatal(err)
	}
	opts = append([]oci.SpecOpts{oci.WithImageConfig(img), oci.WithProcessArgs(args...)}, opts...)
	ctr, err := cl.NewContainer(ctx, id, client.WithImage(img), client.WithNewSnapshot(id, img),
		client.WithRuntime(boxliteRuntime, nil), client.WithNewSpec(opts...))
	if err != nil {
		t.Fatalf("new container %s: %v", id, err)
	}
	return ctr
}

// cleanupTask deletes task (killing it if needed) at cleanup unless the
// test deleted it already.
func (c *containerd) cleanupTask(t testing.TB, task client.Task) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(nsCtx(context.Background()), 20*time.Second)
		defer cancel()
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("delete task %s: %v", task.ID(), err)
		}
	})
}

// startAndWait starts task and returns its exit code (bounded).
func startAndWait(t testing.TB, task client.Task) uint32 {
	t.Helper()
	ctx := nsCtx(context.Background())
	statusC, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	select {
	case st := <-statusC:
		return st.ExitCode()
	case <-time.After(2 * time.Minute):
		t.Fatal("no exit within 2m")
	}
	return 0
}
