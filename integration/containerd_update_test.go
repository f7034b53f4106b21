package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/cgrouptest"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// cgroupLimits is what a box reads of its own cgroup v2 limits (the guest
// runs cgroup v2; without a cgroup namespace /sys/fs/cgroup is the whole
// hierarchy, with one the container's cgroup is its root).
const cgroupLimits = "cd /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup) && cat memory.max cpu.max pids.max"

// TestContainerdTaskUpdateChangesTheLimitsInTheGuest updates a running box
// through containerd's Go client (Task.Update with WithResources: what
// nerdctl update and CRI's UpdateContainerResources do; ctr 2.4 has no
// update command): the container's cgroup in the guest takes the new
// memory, CPU and pids limits. A memory limit above what the VM can hold is
// refused by name and changes nothing, and a stopped task cannot be
// updated. Verified two-sided: before Update was implemented, the first
// update failed with "not implemented".
func TestContainerdTaskUpdateChangesTheLimitsInTheGuest(t *testing.T) {
	c := startContainerd(t)
	// 128 MiB sizes the VM to 192 MiB: the container can have 128 at most.
	// ctr's spec has no /sys/fs/cgroup mount (CRI's and the manager's do).
	id := c.runDetached(t, boxliteRuntime, []string{"--memory-limit", strconv.Itoa(128 << 20),
		"--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:nodev:noexec"}, "sh", "-c", idleScript)
	t.Cleanup(func() { c.forceRemove(t, id) })
	limits := func() string {
		t.Helper()
		r, ok := c.execIn(t, "", id, c.newID(t, "lim"), "sh", "-c", cgroupLimits)
		if !ok || r.code != 0 {
			t.Fatalf("read limits: exit %d stderr %q", r.code, r.stderr)
		}
		return strings.Join(strings.Fields(r.stdout), " ")
	}
	if got, want := limits(), fmt.Sprintf("%d max 100000 max", 128<<20); got != want {
		t.Errorf("limits at create: %q, want %q", got, want)
	}

	ctx := nsCtx(context.Background())
	task := c.loadTask(t, id)
	update := func(res *specs.LinuxResources) error { return task.Update(ctx, client.WithResources(res)) }
	mem, quota, period, pids := int64(64<<20), int64(50000), uint64(100000), int64(64)
	if err := update(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &mem}, CPU: &specs.LinuxCPU{Quota: &quota, Period: &period}}); err != nil {
		t.Fatalf("update memory and CPU: %v", err)
	}
	if got, want := limits(), fmt.Sprintf("%d 50000 100000 max", 64<<20); got != want {
		t.Errorf("limits after the memory and CPU update: %q, want %q", got, want)
	}
	if err := update(&specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}}); err != nil {
		t.Fatalf("update pids: %v", err)
	}
	if got, want := limits(), fmt.Sprintf("%d 50000 100000 64", 64<<20); got != want {
		t.Errorf("limits after the pids update: %q, want %q", got, want)
	}

	big := int64(1 << 30)
	err := update(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &big}})
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "exceeds what the box's VM can hold") || !strings.Contains(err.Error(), "io.boxlite.memory_mib") {
		t.Errorf("update beyond the VM: %v; want a failed precondition naming the VM's size", err)
	}
	if got, want := limits(), fmt.Sprintf("%d 50000 100000 64", 64<<20); got != want {
		t.Errorf("limits after the refused update: %q, want %q (unchanged)", got, want)
	}

	c.mustRun(t, "task", "kill", id)
	c.waitStatus(t, id, "STOPPED")
	small := int64(32 << 20)
	if err := update(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &small}}); err == nil {
		t.Errorf("update of a stopped task succeeded; want an error")
	}
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
}

// forceRemove deletes container id and its task if a failed test left them.
func (c *containerd) forceRemove(t testing.TB, id string) {
	t.Helper()
	if _, ok := c.taskList(t)[id]; ok {
		c.ctr(t, "task", "delete", "--force", id)
	}
	if out := c.ctr(t, "container", "ls", "-q"); strings.Contains(out.stdout, id) {
		c.ctr(t, "container", "rm", id)
	}
}

// loadTask returns the task of container id through the Go client.
func (c *containerd) loadTask(t testing.TB, id string) client.Task {
	t.Helper()
	ctx := nsCtx(context.Background())
	ctr, err := c.goClient(t).LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return task
}

// TestContainerdRuncTaskOptionsReachTheBox creates a box with the task
// options containerd's client helpers set as runc's options type (the shim
// cgroup, the stdio owner, no new keyring): the box runs, and the shim and
// its VMM run in the shim cgroup. Verified two-sided: before the shim
// accepted runc's options type, the task failed with "not boxlite's".
func TestContainerdRuncTaskOptionsReachTheBox(t *testing.T) {
	// Made before containerd starts, so its removal runs after containerd's
	// cleanup: once every shim is gone.
	cgPath := cgrouptest.New(t, "boxlite-test-shim")
	c := startContainerd(t)
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainer(t, id, boxliteRuntime, nil, "sh", "-c", "echo ran; sleep 600")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	var out syncBuffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &out, &out)),
		client.WithShimCgroup(cgPath), client.WithUIDOwner(4321), client.WithGIDOwner(4322), client.WithNoNewKeyring)
	if err != nil {
		t.Fatalf("new task with runc's options: %v", err)
	}
	defer c.deleteTask(t, task)
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the box's output", func() bool { return strings.Contains(out.String(), "ran") })
	vmm := int(task.Pid())
	shim := parentOf(t, vmm)
	for what, pid := range map[string]int{"shim": shim, "VMM": vmm} {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), ":"+cgPath+"\n") {
			t.Errorf("the %s (pid %d) is not in the shim cgroup %s:\n%s", what, pid, cgPath, data)
		}
	}
}

// TestContainerdRefusesRuncOptionsABoxCannotHonour: a runc binary name
// would be silently ignored, so the task fails naming it, and nothing is
// left.
func TestContainerdRefusesRuncOptionsABoxCannotHonour(t *testing.T) {
	c := startContainerd(t)
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainer(t, id, boxliteRuntime, &runcoptions.Options{BinaryName: "/usr/bin/crun"}, "true")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err == nil {
		c.deleteTask(t, task)
		t.Fatal("task created with a runc binary name; want a refusal")
	}
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "binary_name /usr/bin/crun") {
		t.Errorf("err = %v; want invalid argument naming binary_name", err)
	}
	c.assertNothingHalfCreated(t, id, true)
}

// parentOf returns the parent pid of pid.
func parentOf(t testing.TB, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "PPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	t.Fatalf("no PPid in /proc/%d/status", pid)
	return 0
}
