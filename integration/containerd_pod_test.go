package integration

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// CRI's annotations, as containerd's CRI plugin writes them.
const (
	criContainerType = "io.kubernetes.cri.container-type"
	criSandboxID     = "io.kubernetes.cri.sandbox-id"
)

// podSandboxOpts make a container a pod's sandbox (pause) container, as CRI
// does.
func podSandboxOpts(id, hostname string) []oci.SpecOpts {
	return []oci.SpecOpts{
		oci.WithAnnotations(map[string]string{criContainerType: "sandbox", criSandboxID: id}),
		oci.WithHostname(hostname),
	}
}

// podMemberOpts make a container an app container of pod sbID whose sandbox
// task has pid: it names the pod's namespaces by that pid, as CRI does, and
// its pid namespace too when sharePID (shareProcessNamespace).
func podMemberOpts(sbID string, pid uint32, sharePID bool) []oci.SpecOpts {
	types := []specs.LinuxNamespaceType{specs.NetworkNamespace, specs.IPCNamespace, specs.UTSNamespace}
	files := map[specs.LinuxNamespaceType]string{specs.NetworkNamespace: "net", specs.IPCNamespace: "ipc", specs.UTSNamespace: "uts", specs.PIDNamespace: "pid"}
	if sharePID {
		types = append(types, specs.PIDNamespace)
	}
	opts := []oci.SpecOpts{oci.WithAnnotations(map[string]string{criContainerType: "container", criSandboxID: sbID})}
	for _, typ := range types {
		opts = append(opts, oci.WithLinuxNamespace(specs.LinuxNamespace{Type: typ, Path: fmt.Sprintf("/proc/%d/ns/%s", pid, files[typ])}))
	}
	return opts
}

// podTask is a container and its running task.
type podTask struct {
	ctr  client.Container
	task client.Task
}

// startPodTask creates and starts a container of testImage running args
// under boxlite; the test deletes it (killing it) at the end unless it did.
func (c *containerd) startPodTask(t testing.TB, id string, opts []oci.SpecOpts, args ...string) podTask {
	t.Helper()
	ctx := nsCtx(context.Background())
	ctr := c.newContainerWith(t, id, opts, args...)
	t.Cleanup(func() { ctr.Delete(nsCtx(context.Background()), client.WithSnapshotCleanup) })
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatalf("create task %s: %v", id, err)
	}
	c.cleanupTask(t, task)
	if err := task.Start(ctx); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	return podTask{ctr: ctr, task: task}
}

// remove kills and deletes the task and deletes the container.
func (p podTask) remove(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(nsCtx(context.Background()), time.Minute)
	defer cancel()
	if _, err := p.task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Fatalf("delete task %s: %v", p.task.ID(), err)
	}
	if err := p.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatalf("delete container %s: %v", p.ctr.ID(), err)
	}
}

// mustExec runs args in container id and returns its stdout.
func (c *containerd) mustExec(t testing.TB, id string, args ...string) string {
	t.Helper()
	r, ok := c.execIn(t, "", id, fmt.Sprintf("x%d", time.Now().UnixNano()%1e9), args...)
	if !ok || r.code != 0 {
		t.Fatalf("exec %v in %s: exit %d (finished %v): %s", args, id, r.code, ok, r.stderr)
	}
	return r.stdout
}

// qemus returns the live QEMU processes of the test.
func (c *containerd) qemus() []procInfo {
	var out []procInfo
	for _, p := range c.strays() {
		if strings.Contains(p.cmdline, "qemu-system") && p.state != "Z" {
			out = append(out, p)
		}
	}
	return out
}

// TestContainerdPodRunsItsContainersInOneVM runs a pod the way CRI does:
// a sandbox container, then two app containers that name its namespaces
// by the sandbox task's pid. They run in the sandbox's VM (one QEMU, one
// shim, one pid), share its network (one serves on localhost, the other
// reaches it), IPC and UTS namespaces (the pod's hostname) and, with
// shareProcessNamespace, its pid namespace; each keeps its own mount
// namespace. Deleting an app container leaves the VM, and one with the
// same name can be created again (a kubelet restart); removing the pod
// leaves nothing.
func TestContainerdPodRunsItsContainersInOneVM(t *testing.T) {
	c := startContainerd(t)
	sbID := c.newID(t, "pod")
	sb := c.startPodTask(t, sbID, podSandboxOpts(sbID, "podhost"), "sleep", "100000")
	pid := sb.task.Pid()

	srvID := c.newID(t, "srv")
	srv := c.startPodTask(t, srvID, podMemberOpts(sbID, pid, true), "sh", "-c",
		"echo hello-from-the-pod > /tmp/index.html; exec httpd -f -p 8080 -h /tmp")
	cliID := c.newID(t, "cli")
	cli := c.startPodTask(t, cliID, podMemberOpts(sbID, pid, true), "sleep", "100000")

	for _, p := range []podTask{srv, cli} {
		if p.task.Pid() != pid {
			t.Errorf("task %s has pid %d; want the pod's VMM pid %d", p.task.ID(), p.task.Pid(), pid)
		}
	}
	if q := c.qemus(); len(q) != 1 {
		t.Errorf("%d QEMU processes for a pod of 3 containers; want 1: %v", len(q), q)
	}
	if s := c.shims(); len(s) != 1 {
		t.Errorf("%d shims for a pod; want 1: %v", len(s), s)
	}
	var got string
	waitFor(t, time.Minute, "the server through the pod's localhost", func() bool {
		r, ok := c.execIn(t, "", cliID, fmt.Sprintf("w%d", time.Now().UnixNano()%1e9), "wget", "-qO-", "http://127.0.0.1:8080/")
		got = r.stdout
		return ok && r.code == 0
	})
	if !strings.Contains(got, "hello-from-the-pod") {
		t.Errorf("the server answered %q", got)
	}
	if h := strings.TrimSpace(c.mustExec(t, cliID, "hostname")); h != "podhost" {
		t.Errorf("hostname in an app container: %q; want the pod's podhost", h)
	}
	nsOf := func(id string) map[string]string {
		out := c.mustExec(t, id, "sh", "-c", "for n in net ipc uts pid mnt; do echo $n $(readlink /proc/self/ns/$n); done")
		m := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(line); len(f) == 2 {
				m[f[0]] = f[1]
			}
		}
		return m
	}
	pause, server, client := nsOf(sbID), nsOf(srvID), nsOf(cliID)
	for _, n := range []string{"net", "ipc", "uts", "pid"} {
		if pause[n] == "" || server[n] != pause[n] || client[n] != pause[n] {
			t.Errorf("%s namespaces: pause %q, server %q, client %q; want one", n, pause[n], server[n], client[n])
		}
	}
	if server["mnt"] == client["mnt"] {
		t.Errorf("the app containers share a mount namespace %s", server["mnt"])
	}
	if ps := c.mustExec(t, cliID, "ps"); !strings.Contains(ps, "sleep 100000") || !strings.Contains(ps, "httpd") {
		t.Errorf("ps in an app container with a shared pid namespace:\n%s\nwant the pause and the server", ps)
	}

	// An app container leaves; the VM and the others stay.
	cli.remove(t)
	if err := syscall.Kill(int(pid), 0); err != nil {
		t.Fatalf("the pod's VMM after an app container was deleted: %v", err)
	}
	if out := c.mustExec(t, srvID, "cat", "/tmp/index.html"); !strings.Contains(out, "hello-from-the-pod") {
		t.Errorf("the server after its neighbour left: %q", out)
	}
	// The kubelet restarts a container: same name, same VM.
	cli = c.startPodTask(t, cliID, podMemberOpts(sbID, pid, false), "sleep", "100000")
	if again := nsOf(cliID); again["net"] != pause["net"] || again["pid"] == pause["pid"] {
		t.Errorf("the recreated container: net %q pid %q; want the pod's network and its own pid namespace", again["net"], again["pid"])
	}
	if q := c.qemus(); len(q) != 1 {
		t.Errorf("%d QEMU processes after a restart; want 1", len(q))
	}
	cli.remove(t)
	srv.remove(t)
	sb.remove(t)
}

// An app container naming a sandbox this containerd runs no shim for is
// refused with a clear error, and nothing is left.
func TestContainerdPodContainerWithoutItsSandboxIsRefused(t *testing.T) {
	c := startContainerd(t)
	id := c.newID(t, "orphan")
	ctx := nsCtx(context.Background())
	ctr := c.newContainerWith(t, id, podMemberOpts("nosuchpod", 1, false), "true")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	_, err := ctr.NewTask(ctx, cio.NullIO)
	if err == nil || !strings.Contains(err.Error(), "nosuchpod") {
		t.Fatalf("task of a container of a missing pod: %v; want an error naming the sandbox", err)
	}
}
