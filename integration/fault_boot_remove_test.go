package integration

// Fault matrix row 10: a box removed while its VM boots, before its agent
// is ready. A box's Create is what boots its VM (about 1.2 s cold under TCG,
// most of it QEMU's CPU time): the tests boot cold (no template) and act at
// a boot point reached while Create has not returned.

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/boxlite/boxlite/pkg/manager"
	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/shim"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// bootWindowTimeout bounds the wait for a booting box to reach a boot point.
const bootWindowTimeout = 2 * time.Minute

// bootPoint is a moment of a cold boot: the VMM runs and has used at
// least cpu of CPU time. A cold boot takes about 1 s of QEMU's CPU before
// the agent answers, so 300 ms is deep in the guest's boot.
type bootPoint struct {
	name string
	cpu  time.Duration
}

// bootPoints are where the row 10 tests remove a booting box: just after
// the shim launched QEMU (its pid file written; QMP not yet up), and with
// the guest kernel booting.
var bootPoints = []bootPoint{{"vmm-launched", 0}, {"guest-booting", 300 * time.Millisecond}}

// waitBootPoint waits until the VMM of ns/id (found by the pid file in its
// shim state directory) has reached p while done is still open (the call
// that boots the box has not returned), and returns the VMM's pid.
func waitBootPoint(t testing.TB, p bootPoint, ns, id string, done <-chan struct{}) int {
	t.Helper()
	hz := clockTicks(t)
	pidFile := filepath.Join(shimStateDir(ns, id), vmm.PidFileName)
	deadline := time.Now().Add(bootWindowTimeout)
	for {
		if vm, err := reaper.ReadPidFile(pidFile); err == nil {
			if ok, _ := vm.Running(); ok && cpuTime(t, vm.Pid, hz) >= p.cpu {
				return vm.Pid
			}
		}
		select {
		case <-done:
			t.Fatalf("the box's Create returned before its boot reached %s (%s)", p.name, pidFile)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the boot of %s/%s did not reach %s within %v", ns, id, p.name, bootWindowTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// coldBoot is the annotation that makes a box boot cold (no VM template):
// the boot then lasts long enough to act within it.
var coldBoot = oci.WithAnnotations(map[string]string{shim.AnnotationTemplates: "false"})

// TestManagerForceRemoveDuringBoot removes a box with `rm --force` while
// `run -d` is still booting it (fault matrix row 10), at each boot point:
// rm succeeds, run -d fails with one line saying the box was removed while
// it was being created and prints no id, the VMM and shim are gone and
// reaped, no record, shim state directory, mount or socket is left (the
// harness's leak checks), and no event names a box that never ran.
// Verified two-sided: before the shim's Shutdown waited for the Create in
// progress, the shim exited mid-boot and left the box's VM state directory
// with its share, QEMU root and proc mounts (assertNoNewShimState failed);
// before the manager explained an aborted create, run -d said only
// "create box: ttrpc: closed".
func TestManagerForceRemoveDuringBoot(t *testing.T) {
	for _, bp := range bootPoints {
		t.Run(bp.name, func(t *testing.T) { testManagerForceRemoveDuringBoot(t, bp) })
	}
}

func testManagerForceRemoveDuringBoot(t *testing.T, bp bootPoint) {
	m := newMgr(t)
	m.env = append(m.env, shim.TemplatesEnv+"=off")
	lines := m.events()
	p, out, errOut := m.startBoxlite("run", "-d", "--name", "booting", "--rootfs", m.rootfs, "--", "sleep", "1000")
	id := waitBoxDir(t, m, p)
	vm := waitBootPoint(t, bp, manager.Namespace, id, p.Done())

	if r := m.run(nil, "rm", "--force", "booting"); r.code != 0 {
		t.Fatalf("rm --force during boot: %v", r)
	}
	e, err := p.Wait(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	msg := strings.TrimSpace(errOut.String())
	t.Logf("run -d: exit %d, stderr %q", e.Status, msg)
	if e.Status == 0 || out.String() != "" {
		t.Errorf("run -d of a box removed during boot: exit %d, stdout %q; want a failure and no id", e.Status, out.String())
	}
	// The shim answers the abandoned Create with Aborted, unless it exits
	// before the answer is sent.
	if !abortedCreate.MatchString(msg) || strings.Count(msg, "\n") > 0 {
		t.Errorf("run -d said %q; want one line matching %s", msg, abortedCreate)
	}
	waitGone(t, "VMM", vm)
	if ids := strings.Fields(m.ok("ps", "-q")); len(ids) > 0 {
		t.Errorf("boxes left after rm --force: %v", ids)
	}
	if _, err := os.Stat(filepath.Join(m.state, "boxes", id)); !os.IsNotExist(err) {
		t.Errorf("box directory left: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(m.state, "s")); len(entries) > 0 {
		t.Errorf("shim socket left: %s", entries[0].Name())
	}
	// Nothing ran: no event may name the box. rm returned after the shim
	// exited, so what the events command printed by now is all there is.
	for drained := false; !drained; {
		select {
		case l := <-lines:
			if strings.Contains(l, id) {
				t.Errorf("event for a box that never ran: %q", l)
			}
		default:
			drained = true
		}
	}
}

// abortedCreate is what `run -d --name booting` says when its box was
// removed during boot.
var abortedCreate = regexp.MustCompile(`^boxlite: box booting( was removed or stopped while it was being created|: its shim exited while creating it)$`)

// waitBoxDir waits for the box directory a booting `run` made and returns
// the box's id, read from the state directory (ps would reconcile the
// record with a shim that is still creating the task).
func waitBoxDir(t testing.TB, m *mgr, p *reaper.Process) string {
	t.Helper()
	deadline := time.Now().Add(bootWindowTimeout)
	for {
		entries, _ := os.ReadDir(filepath.Join(m.state, "boxes"))
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				return e.Name()
			}
		}
		select {
		case <-p.Done():
			t.Fatalf("run exited before its box appeared")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no box directory within %v", bootWindowTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestContainerdCreateCancelledDuringBoot cancels a client's NewTask while
// the shim boots the box's VM (fault matrix row 10 through containerd), at
// each boot point: NewTask fails with the cancellation, containerd deletes
// the task (not found) and shuts the shim down, and the shim cancels the
// boot and undoes it before it exits: no task, no event, the VMM and shim
// gone, no shim state directory or mount (and the harness's leak checks),
// and the container can be removed. Verified two-sided: before the shim's
// Shutdown waited for the Create in progress, it exited at once and left
// the VM's state directory and its mounts.
func TestContainerdCreateCancelledDuringBoot(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	for _, bp := range bootPoints {
		t.Run(bp.name, func(t *testing.T) {
			id := c.newID(t, "bx")
			ctr := c.newContainerWith(t, id, []oci.SpecOpts{coldBoot}, "sleep", "1000")
			ctx, cancel := context.WithCancel(nsCtx(context.Background()))
			done := make(chan struct{})
			var taskErr error
			go func() {
				defer close(done)
				var task client.Task
				task, taskErr = ctr.NewTask(ctx, cio.NullIO)
				if taskErr == nil {
					c.deleteTask(t, task)
				}
			}()
			vm := waitBootPoint(t, bp, testNamespace, id, done)
			shimPid := c.shimOf(t, id)
			cancel()
			<-done
			if !errors.Is(taskErr, context.Canceled) {
				t.Errorf("NewTask cancelled during boot: %v, want context.Canceled", taskErr)
			}
			pidGone(t, vm, "VMM of the cancelled create")
			pidGone(t, shimPid, "shim of the cancelled create")
			c.assertBootAbandoned(t, l, id)
			if err := ctr.Delete(nsCtx(context.Background()), client.WithSnapshotCleanup); err != nil {
				t.Errorf("remove the container: %v", err)
			}
		})
	}
}

// TestContainerdForceDeleteDuringBootIsNotFound runs `ctr task delete
// --force` while `ctr task start` boots the box (fault matrix row 10): as
// with runc, a task whose Create has not returned does not exist yet, so
// the delete fails saying so and the boot goes on: the start succeeds, and
// a later forced delete and `ctr container rm` work, with TaskExit 137 and
// TaskDelete, and nothing left (the harness's leak checks).
func TestContainerdForceDeleteDuringBootIsNotFound(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	id := c.newID(t, "bx")
	c.mustRun(t, "container", "create", "--runtime", boxliteRuntime,
		"--annotation", shim.AnnotationTemplates+"=false", testImage, id, "sleep", "1000")
	start := c.startCtr(t, nil, "task", "start", "--null-io", "-d", id)
	waitBootPoint(t, bootPoints[1], testNamespace, id, start.proc.Done())
	del := c.ctr(t, "task", "delete", "--force", id)
	if del.code == 0 || !strings.Contains(del.stderr, "not found") {
		t.Errorf("ctr task delete --force during boot: exit %d, stderr %q; want not found", del.code, del.stderr)
	}
	if r := start.wait(t); r.code != 0 {
		t.Fatalf("ctr task start after a refused delete: exit %d, stderr %q", r.code, r.stderr)
	}
	c.waitStatus(t, id, "RUNNING")
	c.mustRun(t, "task", "delete", "--force", id)
	c.mustRun(t, "container", "rm", id)
	if !l.waitFor(id, "/tasks/create /tasks/start /tasks/exit=137 /tasks/delete=137", time.Minute) {
		t.Errorf("events: got %q, want create, start, exit 137, delete 137", fmtEvents(l.of(id)))
	}
}

// assertBootAbandoned checks that a box whose Create was abandoned left no
// task, no shim state directory, no mount in it, and published no task
// event.
func (c *containerd) assertBootAbandoned(t testing.TB, l *eventLog, id string) {
	t.Helper()
	waitFor(t, time.Minute, "task "+id+" gone from ctr task ls", func() bool {
		_, ok := c.taskList(t)[id]
		return !ok
	})
	d := shimStateDir(testNamespace, id)
	if dirExists(d) {
		t.Errorf("shim state directory %s left", d)
	}
	if m := mountedUnder(d); len(m) > 0 {
		t.Errorf("mounts left in the shim state directory: %v", m)
	}
	if evs := l.of(id); len(evs) > 0 {
		t.Errorf("task events for a box that never ran: %s", fmtEvents(evs))
	}
}
