package integration

// Fault matrix row 8: containerd restarted while a box's Create or Start is
// in flight (a restart while the box runs is
// TestContainerdRestartKeepsTheBoxRunning). The shim outlives containerd;
// when containerd exits, the ttrpc connection it served the call on closes
// and ttrpc cancels the call's context in the shim. What the shim did with
// the call then decides what the restarted containerd finds: it reloads
// every shim whose bundle is left in its state directory
// (io.containerd.runtime.v2.task/<ns>/<id>), keeps those whose task has
// processes and deletes and shuts down the others.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/health"
	"github.com/boxlite/boxlite/pkg/shim"
)

// daemonStops are the two ways containerd goes down in a restart: systemd's
// stop (SIGTERM, which containerd handles by closing its plugins and
// exiting) and a crash or a stop that timed out (SIGKILL).
var daemonStops = []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL}

// restartAndRemove leaves the daemon as a test that failed midway may not
// have: running, and box id's task and container removed, for the next
// subtest and the leak checks.
func (c *containerd) restartAndRemove(t testing.TB, id string) {
	t.Helper()
	if c.pid() == 0 {
		c.start(t)
	}
	c.forceRemove(t, id)
}

// bundleOf is containerd's bundle (state) directory of task id.
func (c *containerd) bundleOf(id string) string {
	return filepath.Join(c.dir, "state", "io.containerd.runtime.v2.task", testNamespace, id)
}

// TestContainerdRestartDuringCreate stops containerd (SIGTERM and SIGKILL)
// while `ctr run -d` is in the box's Create, at each boot point of a cold
// boot, and starts it again. What happens: ctr fails (its daemon went
// away); the shim, left running, sees the call's connection close, which
// cancels the Create: it stops the boot and undoes it while containerd is
// down (the VMM is killed and reaped, the shim state directory with its
// mounts removed). The restarted containerd reloads the shim from the
// bundle, finds no task in it (Pids is NotFound), deletes it and shuts it
// down (or, when the stopping containerd managed to shut the shim down
// itself, runs the shim's delete action for the dead shim's bundle): no
// task is listed, the shim exits, the bundle and its rootfs mount are
// gone, and no task event names the box but those of a new task the
// container then runs, kills and deletes; `ctr container rm` works (and
// the harness's leak checks: processes, mounts, state directories, the
// VMM's cgroup).
func TestContainerdRestartDuringCreate(t *testing.T) {
	c := startContainerd(t)
	for _, sig := range daemonStops {
		for _, bp := range bootPoints {
			t.Run(unix.SignalName(sig)+"/"+bp.name, func(t *testing.T) { testRestartDuringCreate(t, c, sig, bp) })
		}
	}
}

func testRestartDuringCreate(t *testing.T, c *containerd, sig syscall.Signal, bp bootPoint) {
	l := c.subscribe(t)
	id := c.newID(t, "bx")
	t.Cleanup(func() { c.restartAndRemove(t, id) })
	args := append(append([]string{"run", "-d", "--null-io", "--annotation", shim.AnnotationTemplates + "=false"},
		c.runtimeFlags(boxliteRuntime)...), testImage, id, "sleep", "1000")
	run := c.startCtr(t, nil, args...)
	vm := waitBootPoint(t, bp, testNamespace, id, run.proc.Done())
	shimPid := c.shimOf(t, id)

	c.stopWith(t, sig)
	r := run.wait(t)
	t.Logf("ctr run -d when containerd went down (%v) at %s: exit %d, stderr %q", sig, bp.name, r.code, strings.TrimSpace(r.stderr))
	if r.code == 0 {
		t.Errorf("ctr run -d succeeded although containerd stopped during its Create")
	}
	l.stop()
	if evs := l.of(id); len(evs) > 0 {
		t.Errorf("task events before the stop for a box whose Create never returned: %s", fmtEvents(evs))
	}
	// containerd is down: the shim alone undoes the boot.
	pidGone(t, vm, "VMM of the Create interrupted by the restart")
	waitFor(t, settleTimeout, "the shim to remove the box's state directory", func() bool {
		return !dirExists(shimStateDir(testNamespace, id))
	})
	// Usually the shim outlives containerd and waits for it; a SIGTERM'd
	// containerd sometimes still runs its failed Create's cleanup
	// (Delete, then Shutdown) before it exits, and the shim then ends.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", shimPid)); err == nil && !strings.Contains(string(st), "State:\tZ") {
		t.Logf("the shim outlived containerd")
	} else {
		t.Logf("containerd shut the shim down as it stopped")
	}
	waitFor(t, settleTimeout, "the shim to unmount the box's rootfs", func() bool {
		return len(mountedUnder(c.rootfsOf(id))) == 0
	})

	c.start(t)
	l = c.subscribe(t)
	if tasks := c.taskList(t); tasks[id] != ([2]string{}) {
		t.Errorf("after the restart ctr task ls lists %s as %v; its Create never completed", id, tasks[id])
	}
	pidGone(t, shimPid, "shim of the interrupted Create, after the restart")
	waitFor(t, settleTimeout, "containerd to remove the bundle", func() bool { return !dirExists(c.bundleOf(id)) })
	if m := mountedUnder(c.bundleOf(id)); len(m) > 0 {
		t.Errorf("mounts left in the bundle: %v", m)
	}
	if r := c.ctr(t, "task", "delete", id); r.code == 0 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("ctr task delete after the restart: exit %d, stderr %q; want not found", r.code, r.stderr)
	}
	// The container is as it was before its first task: a new one boots,
	// runs and goes, and its events are the only ones naming the box.
	c.mustRun(t, "task", "start", "-d", "--null-io", id)
	c.waitStatus(t, id, "RUNNING")
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
	const want = "/tasks/create /tasks/start /tasks/exit=137 /tasks/delete=137"
	if !l.waitFor(id, want, time.Minute) || fmtEvents(l.of(id)) != want {
		t.Errorf("events after the restart: got %q, want %q", fmtEvents(l.of(id)), want)
	}
}

// healthOff turns a box's health check off: its probes would be calls to
// the guest that a frozen VMM leaves pending.
var healthOff = oci.WithAnnotations(map[string]string{health.AnnotationDisabled: "true"})

// pendingToGuest is how many bytes the shim wrote to the VMM that the VMM
// has not read: the receive queues of QEMU's unix sockets (the agent's
// virtio-serial and QMP), from ss.
func pendingToGuest(t testing.TB, vmm int) int {
	t.Helper()
	out, err := runHost("ss", "-xpnH")
	if err != nil {
		t.Fatalf("ss: %v", err)
	}
	n := 0
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 || !strings.Contains(l, fmt.Sprintf("pid=%d,", vmm)) {
			continue
		}
		q, err := strconv.Atoi(f[2])
		if err != nil {
			t.Fatalf("ss line %q: Recv-Q %q", l, f[2])
		}
		n += q
	}
	return n
}

// TestContainerdRestartDuringStart stops containerd (SIGTERM and SIGKILL)
// while a created box's Start is in flight and starts it again: whichever
// way the Start went, containerd's view after the restart must be the
// guest's (CREATED and startable, or RUNNING and refusing a second start),
// kill, delete and `ctr container rm` must work with TaskExit and
// TaskDelete 137, and nothing be left (the harness's leak checks).
//
// "race": the Go client's Start is sent and containerd stopped at once;
// the Start reaches the shim or not.
//
// "guest-frozen": the window made deterministic. The VMM is stopped
// (SIGSTOP) and Start sent: the shim sends the start to the agent, which
// cannot answer; once the request is queued on the VMM's socket (ss),
// containerd is stopped, which cancels the shim's Start (ttrpc cancels a
// call whose connection closed), then the VMM continues and the guest
// starts the process. The box runs and must be reported RUNNING.
//
// Verified two-sided: while the shim's agent call took the Start's
// context, both guest-frozen cases (and race/SIGTERM once in two runs) left
// the task CREATED after the restart while its process ran in the guest,
// and a start then failed with the guest's "cannot start container ... in
// running state"; with the call detached they pass.
func TestContainerdRestartDuringStart(t *testing.T) {
	c := startContainerd(t)
	for _, frozen := range []bool{false, true} {
		for _, sig := range daemonStops {
			name := "race"
			if frozen {
				name = "guest-frozen"
			}
			t.Run(name+"/"+unix.SignalName(sig), func(t *testing.T) { testRestartDuringStart(t, c, sig, frozen) })
		}
	}
}

func testRestartDuringStart(t *testing.T, c *containerd, sig syscall.Signal, frozen bool) {
	ctx := nsCtx(context.Background())
	id := c.newID(t, "bx")
	ctr := c.newContainerWith(t, id, []oci.SpecOpts{healthOff}, "sleep", "1000")
	t.Cleanup(func() { c.restartAndRemove(t, id) })
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatalf("new task: %v", err)
	}
	vmm := int(task.Pid())
	shimPid := c.shimOf(t, id)
	if frozen {
		before := pendingToGuest(t, vmm)
		if err := syscall.Kill(vmm, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		// Whatever happens, a stopped process is not left behind.
		defer syscall.Kill(vmm, syscall.SIGCONT)
		startErr := c.startInBackground(t, id)
		waitFor(t, time.Minute, "the Start to reach the frozen guest", func() bool { return pendingToGuest(t, vmm) > before })
		c.stopWith(t, sig)
		t.Logf("Start when containerd went down (%v): %v", sig, <-startErr)
		if err := syscall.Kill(vmm, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		waitFor(t, time.Minute, "the guest to take the Start", func() bool { return pendingToGuest(t, vmm) <= before })
	} else {
		startErr := c.startInBackground(t, id)
		c.stopWith(t, sig)
		t.Logf("Start when containerd went down (%v): %v", sig, <-startErr)
	}

	c.start(t)
	l := c.subscribe(t)
	var got [2]string
	waitFor(t, time.Minute, id+" listed after the restart", func() bool {
		got = c.taskList(t)[id]
		return got[1] != ""
	})
	if got[0] != strconv.Itoa(vmm) {
		t.Errorf("after the restart %s has pid %s, want the VMM's %d", id, got[0], vmm)
	}
	// What the restarted daemon publishes from here on. A TaskStart the
	// shim sent while containerd was down is dropped (the shim does not
	// retry it); one sent once the daemon was back may arrive before this
	// subscription or after it, always before the exit.
	want := "/tasks/exit=137 /tasks/delete=137"
	startSeen := false
	switch {
	case got[1] == "CREATED" && !frozen:
		// The Start never reached the shim: the box can be started now.
		t.Logf("the Start was lost with containerd: %s is CREATED", id)
		if err := c.loadTask(t, id).Start(ctx); err != nil {
			t.Fatalf("start of the created box after the restart: %v", err)
		}
		c.waitStatus(t, id, "RUNNING")
		want = "/tasks/start " + want
		startSeen = true
	case got[1] == "RUNNING":
		t.Logf("the Start went through: %s is RUNNING", id)
		if err := c.loadTask(t, id).Start(ctx); !errdefs.IsFailedPrecondition(err) {
			t.Errorf("a second start of the running box: %v, want a failed precondition", err)
		}
	default:
		t.Fatalf("after the restart %s is %s (a start now: %v); the guest took its Start, want RUNNING",
			id, got[1], c.loadTask(t, id).Start(ctx))
	}
	if ps := c.mustRun(t, "task", "ps", id); len(strings.Split(strings.TrimSpace(ps), "\n")) < 2 {
		t.Errorf("ctr task ps of the running box: %q", ps)
	}
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
	if !l.waitFor(id, want, time.Minute) {
		t.Errorf("events after the restart: got %q, want %q", fmtEvents(l.of(id)), want)
	} else if evs := fmtEvents(l.of(id)); evs != want && (startSeen || evs != "/tasks/start "+want) {
		t.Errorf("events after the restart: got %q, want %q (or a late TaskStart first)", evs, want)
	} else {
		t.Logf("events after the restart: %s", evs)
	}
	pidGone(t, vmm, "VMM")
	pidGone(t, shimPid, "shim")
}

// startInBackground sends task id's Start through a client of its own (the
// harness's client is closed first when the daemon stops) and returns where
// its error will come.
func (c *containerd) startInBackground(t testing.TB, id string) <-chan error {
	t.Helper()
	ctx := nsCtx(context.Background())
	cl, err := client.New(c.addr, client.WithDefaultNamespace(testNamespace))
	if err != nil {
		t.Fatal(err)
	}
	ctr, err := cl.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		defer cl.Close()
		errc <- task.Start(ctx)
	}()
	return errc
}
