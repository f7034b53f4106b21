package integration

// Fault matrix row 9: the manager killed mid-run. `boxlite run -d` (and
// `boxlite serve`) is SIGKILLed after the shim's start and before the box's
// Create, during Create (the VM booting), and between Create and Start. A
// box's record names the process creating it until its Create returned;
// the next command that reads the record finds that process dead and
// recovers the box: a task the shim had created makes a created box, which
// starts and is removed like any other; anything less is undone (the shim
// ended, its VM, socket and state directory removed) and the box reads
// stopped 137 until it is removed. The manager kills itself at named points
// through its test-only fault variable (manager.FaultDieAtEnv); the kills
// during the boot are the test's, at row 10's boot points.

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/manager"
	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/shim"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// interruption is one moment at which the manager dies mid-run.
type interruption struct {
	name string
	// point is the manager's fault point (manager.FaultDieAtEnv), or ""
	// for a SIGKILL by the test at boot.
	point string
	boot  bootPoint
	// created says the shim had created the task: recovery finds a
	// created box (otherwise a half-made one, undone: stopped 137).
	created bool
}

var interruptions = []interruption{
	{name: "after-shim-start", point: "after-shim-start"},
	{name: "after-shim-address", point: "after-shim-address"},
	{name: "after-bootstrap", point: "after-bootstrap"},
	{name: "during-create-" + bootPoints[0].name, boot: bootPoints[0]},
	{name: "during-create-" + bootPoints[1].name, boot: bootPoints[1]},
	{name: "after-task-create", point: "after-task-create", created: true},
	{name: "after-create", point: "after-create", created: true},
}

// TestManagerKilledMidRun SIGKILLs `boxlite run -d` at each interruption
// and checks what the next commands find: ps (the first to read the
// record) shows the box created with its shim and VMM, or stopped 137 with
// neither; a created box starts (events create, start, then exit 137 and
// delete at rm --force); a stopped one refuses start, is removed by a
// plain rm, and no event names it; and each time the shim and VMM are
// gone, no socket is left in <state>/s, no shim state directory or mount
// (and the harness's leak checks: processes, zombies, mounts, VMM
// cgroups). Verified two-sided: with the record's creator ignored (the
// recovery before this fix), a kill at after-shim-start left the shim
// serving and its socket after rm (waitGone and the leak check failed),
// and after after-bootstrap and at both boot points ps showed stopped 137
// with the shim still running and listed; after-shim-address,
// after-task-create and after-create passed before too (a recorded address
// without a pid, and a task the shim had created, were recovered already).
func TestManagerKilledMidRun(t *testing.T) {
	for _, in := range interruptions {
		t.Run(in.name, func(t *testing.T) { testManagerKilledMidRun(t, in) })
	}
}

func testManagerKilledMidRun(t *testing.T, in interruption) {
	m := newMgr(t)
	var env []string
	if in.point == "" {
		m.env = append(m.env, shim.TemplatesEnv+"=off")
	} else {
		env = []string{manager.FaultDieAtEnv + "=" + in.point}
	}
	lines := m.events()
	p, out, errOut := m.startBoxliteEnv(env, "run", "-d", "--name", "half", "--rootfs", m.rootfs, "--", "sleep", "1000")
	id := waitBoxDir(t, m, p)
	if in.point == "" {
		waitBootPoint(t, in.boot, manager.Namespace, id, p.Done())
		p.Signal(syscall.SIGKILL)
	}
	waitKilled(t, p, out, errOut)
	shimPid, vmmPid := leftBehind(t, id, in.created)

	row := m.psRow(id)
	if in.created {
		want := []string{id, "half", "created", "-", strconv.Itoa(shimPid), strconv.Itoa(vmmPid)}
		if row == nil || strings.Join(row[:6], " ") != strings.Join(want, " ") {
			t.Fatalf("ps after the manager died %s: %q, want %q", in.name, row, want)
		}
		if got := m.inspect(id, "{{.Status}} {{.ExitStatus}}"); got != "created 0" {
			t.Errorf("inspect: %q, want created 0", got)
		}
		m.ok("start", "half")
		if row := m.psRow(id); row == nil || row[2] != "running" {
			t.Errorf("ps after start: %q, want running", row)
		}
		m.ok("rm", "--force", "half")
		want = []string{"/tasks/create", "/tasks/start", "/tasks/exit=137", "/tasks/delete"}
		if got := boxEvents(t, lines, id, "/tasks/delete"); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("events of the recovered box: %q, want %q", got, want)
		}
	} else {
		if row == nil || strings.Join(row[2:6], " ") != "stopped 137 - -" {
			t.Fatalf("ps after the manager died %s: %q, want stopped 137 without pids", in.name, row)
		}
		// The first command that read the record undid the half-made box.
		waitGone(t, "shim", shimPid)
		if vmmPid > 0 {
			waitGone(t, "VMM", vmmPid)
		}
		m.assertNoShimLeft(t, id)
		if r := m.run(nil, "start", "half"); r.code == 0 || !strings.Contains(r.stderr, "only a created box can be started") {
			t.Errorf("start of the undone box: %v", r)
		}
		m.ok("rm", "half")
		// Nothing ran: no event may name the box (the shim is gone, so
		// what it published is printed by now).
		assertNoEventsOf(t, lines, id)
	}
	waitGone(t, "shim", shimPid)
	if vmmPid > 0 {
		waitGone(t, "VMM", vmmPid)
	}
	if _, err := os.Stat(filepath.Join(m.state, "boxes", id)); !os.IsNotExist(err) {
		t.Errorf("box directory left after rm: %v", err)
	}
	m.assertNoShimLeft(t, id)
}

// TestServeKilledMidCreate SIGKILLs `boxlite serve` in a box's Create (at
// three of the interruptions) and starts it again: the new daemon recovers
// the box before it answers. Half made, the shim is gone by then and the
// box reads stopped 137 (start refused, plain remove works); with its
// task created, the box reads created with its shim, starts and is
// removed. Nothing is left (the harness's leak checks). Verified
// two-sided: with the record's creator ignored, the restarted daemon left
// the shim of after-shim-start serving, with its socket, through the
// remove (the leak check failed), and listed the box of after-bootstrap as
// stopped 137 with its shim alive; after-task-create passed before too.
func TestServeKilledMidCreate(t *testing.T) {
	for _, in := range interruptions {
		if in.point == "after-shim-start" || in.point == "after-bootstrap" || in.point == "after-task-create" {
			t.Run(in.name, func(t *testing.T) { testServeKilledMidCreate(t, in) })
		}
	}
}

func testServeKilledMidCreate(t *testing.T, in interruption) {
	m := newMgr(t)
	d1 := m.serve([]string{manager.FaultDieAtEnv + "=" + in.point})
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	if id, err := d1.c.Create(ctx, sleepBox(m.rootfs)); err == nil {
		t.Fatalf("create through a daemon killed at %s returned box %s", in.point, id)
	}
	d1.stopped = true // it is dead: nothing to stop
	d1.c.Close()
	if e, err := d1.p.Wait(ctx); err != nil || e.Signal != syscall.SIGKILL {
		t.Fatalf("boxlite serve at %s: %v (%v), want killed by SIGKILL: %s", in.point, e, err, d1.log())
	}
	id := onlyBoxDir(t, m)
	shimPid, vmmPid := leftBehind(t, id, in.created)

	d2 := m.serve(nil)
	b, err := d2.c.Inspect(ctx, id)
	if err != nil {
		t.Fatalf("inspect after the restart: %v", err)
	}
	if in.created {
		if b.Status != "created" || b.ShimPid != shimPid || b.VMMPid != vmmPid {
			t.Fatalf("box after the restart: %s, shim %d, VMM %d; want created, %d, %d", b.Status, b.ShimPid, b.VMMPid, shimPid, vmmPid)
		}
		if err := d2.c.Start(ctx, id); err != nil {
			t.Fatalf("start the recovered box: %v", err)
		}
		if b, err := d2.c.Inspect(ctx, id); err != nil || b.Status != "running" {
			t.Errorf("after start: %s (%v), want running", b.Status, err)
		}
		if err := d2.c.Remove(ctx, id, true); err != nil {
			t.Fatalf("force-remove: %v", err)
		}
	} else {
		if b.Status != "stopped" || b.ExitStatus != 137 || b.ShimPid != 0 {
			t.Fatalf("box after the restart: %s %d, shim %d; want stopped 137 without a shim", b.Status, b.ExitStatus, b.ShimPid)
		}
		// The daemon recovered the box before it answered.
		if st := procStatus(shimPid); st != "gone" && !strings.Contains(st, "State:\tZ") {
			t.Errorf("shim pid %d still runs after the daemon's recovery: %s", shimPid, st)
		}
		m.assertNoShimLeft(t, id)
		if err := d2.c.Start(ctx, id); err == nil {
			t.Errorf("start of the undone box succeeded")
		}
		if err := d2.c.Remove(ctx, id, false); err != nil {
			t.Fatalf("remove: %v", err)
		}
	}
	waitGone(t, "shim", shimPid)
	if vmmPid > 0 {
		waitGone(t, "VMM", vmmPid)
	}
	if boxes, err := d2.c.List(ctx, api.ListFilter{}); err != nil || len(boxes) > 0 {
		t.Errorf("boxes after remove: %+v (%v)", boxes, err)
	}
	m.assertNoShimLeft(t, id)
}

// TestManagerPsDuringAnotherRunsBootShowsCreated runs ps while `run -d`
// boots its box: the box reads created (another process is creating it)
// and, once run -d returned, running with no exit status. Verified
// two-sided: before records named their creator, ps asked the shim for a
// task it had not created yet and recorded the box stopped 137, and after
// the boot it read running with exit status 137.
func TestManagerPsDuringAnotherRunsBootShowsCreated(t *testing.T) {
	m := newMgr(t)
	m.env = append(m.env, shim.TemplatesEnv+"=off")
	p, out, errOut := m.startBoxlite("run", "-d", "--name", "booting", "--rootfs", m.rootfs, "--", "sleep", "1000")
	id := waitBoxDir(t, m, p)
	waitBootPoint(t, bootPoints[1], manager.Namespace, id, p.Done())
	row := m.psRow(id)
	e, err := p.Wait(t.Context())
	if err != nil || e.Status != 0 || strings.TrimSpace(out.String()) != id {
		t.Fatalf("run -d: %v (%v), stdout %q, stderr %q", e, err, out.String(), errOut.String())
	}
	if row == nil || row[2] != "created" || row[3] != "-" {
		t.Errorf("ps during the boot: %q, want created", row)
	}
	if got := m.inspect(id, "{{.Status}} {{.ExitStatus}}"); got != "running 0" {
		t.Errorf("inspect after run -d: %q, want running 0", got)
	}
	shimPid, vmmPid := m.pids(id)
	m.ok("rm", "--force", id)
	waitGone(t, "shim", shimPid)
	waitGone(t, "VMM", vmmPid)
}

// TestManagerRemoveBeforeTheShimAnswered removes a box with rm --force
// while its `run -d` is stopped (manager.FaultStopAtEnv) right after the
// shim's start action returned, before the shim's address is recorded,
// then lets run -d go on: it fails saying the box was removed, prints no
// id, and kills and reaps the shim it started, whose bundle (its working directory) rm
// removed meanwhile; no socket or box is left. Verified two-sided: while
// the manager matched a stray shim's working directory against the bundle
// path only, it did not recognise "<bundle> (deleted)": the shim survived
// (waitGone failed), serving its socket in <state>/s.
func TestManagerRemoveBeforeTheShimAnswered(t *testing.T) {
	m := newMgr(t)
	p, out, errOut := m.startBoxliteEnv([]string{manager.FaultStopAtEnv + "=after-shim-start"},
		"run", "-d", "--name", "early", "--rootfs", m.rootfs, "--", "sleep", "1000")
	id := waitBoxDir(t, m, p)
	waitProcState(t, p, "T")
	shims := shimsOf(m, id)
	if len(shims) != 1 {
		t.Fatalf("shims of box %s while run -d is stopped: %v, want one", id, shims)
	}
	m.ok("rm", "--force", "early")
	if err := syscall.Kill(p.Pid(), syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	e, err := p.Wait(t.Context())
	msg := strings.TrimSpace(errOut.String())
	t.Logf("run -d: %v, stderr %q", e, msg)
	if err != nil || e.Status == 0 || out.String() != "" {
		t.Errorf("run -d of a box removed before its shim answered: %v (%v), stdout %q; want a failure and no id", e, err, out.String())
	}
	lines := strings.Split(msg, "\n")
	if want := "boxlite: box early was removed or stopped while it was being created"; lines[len(lines)-1] != want {
		t.Errorf("run -d said %q last; want %q", lines[len(lines)-1], want)
	}
	waitGone(t, "shim", shims[0].pid)
	if _, err := os.Stat(filepath.Join(m.state, "boxes", id)); !os.IsNotExist(err) {
		t.Errorf("box directory left: %v", err)
	}
	m.assertNoShimLeft(t, id)
}

// startBoxliteEnv is startBoxlite with env added to this run only.
func (m *mgr) startBoxliteEnv(env []string, args ...string) (*reaper.Process, *lockedBuffer, *lockedBuffer) {
	m.t.Helper()
	saved := m.env
	m.env = append(append([]string(nil), m.env...), env...)
	defer func() { m.env = saved }()
	return m.startBoxlite(args...)
}

// waitKilled waits for a boxlite process the test or its fault point
// killed, and checks it died by SIGKILL without printing a box id.
func waitKilled(t testing.TB, p *reaper.Process, out, errOut *lockedBuffer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), mgrTimeout)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		t.Fatalf("boxlite run was not killed: %v: %s", err, errOut.String())
	}
	if e.Signal != syscall.SIGKILL || out.String() != "" {
		t.Fatalf("boxlite run: %v, stdout %q, stderr %q; want killed by SIGKILL, no id", e, out.String(), errOut.String())
	}
}

// leftBehind returns the shim (one, alive) a killed manager left for box
// id and its VMM (0 when none runs; one must when the task was created).
func leftBehind(t testing.TB, id string, created bool) (shimPid, vmmPid int) {
	t.Helper()
	shims := longLivedShims(id)
	if len(shims) != 1 {
		t.Fatalf("shims left by the killed manager for box %s: %v, want one", id, shims)
	}
	vm, err := reaper.ReadPidFile(filepath.Join(shimStateDir(manager.Namespace, id), vmm.PidFileName))
	if ok, _ := vm.Running(); err == nil && ok {
		vmmPid = vm.Pid
	}
	if created && vmmPid == 0 {
		t.Fatalf("box %s: the task was created but no VMM runs (%v)", id, err)
	}
	return shims[0].pid, vmmPid
}

// shimsOf returns the live long-lived shims of box id of m, whatever their
// parent.
func shimsOf(m *mgr, id string) []procInfo {
	var out []procInfo
	for _, p := range listProcs() {
		if p.state != "Z" && strings.Contains(p.cmdline, m.state) && strings.Contains(p.cmdline+" ", " -id "+id+" ") &&
			!strings.HasSuffix(p.cmdline, " start") && !strings.HasSuffix(p.cmdline, " delete") {
			out = append(out, p)
		}
	}
	return out
}

// waitProcState waits until p's state (/proc/<pid>/stat) is state.
func waitProcState(t testing.TB, p *reaper.Process, state string) {
	t.Helper()
	deadline := time.Now().Add(bootWindowTimeout)
	for {
		for _, q := range listProcs() {
			if q.pid == p.Pid() && q.state == state {
				return
			}
		}
		select {
		case <-p.Done():
			t.Fatalf("pid %d exited before reaching state %s", p.Pid(), state)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not in state %s within %v: %s", p.Pid(), state, bootWindowTimeout, procStatus(p.Pid()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// onlyBoxDir returns the id of the one box directory in m's state.
func onlyBoxDir(t testing.TB, m *mgr) string {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(m.state, "boxes"))
	var ids []string
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			ids = append(ids, e.Name())
		}
	}
	if len(ids) != 1 {
		t.Fatalf("box directories: %v, want one", ids)
	}
	return ids[0]
}

// assertNoShimLeft checks that box id left no socket in <state>/s, no
// shim state directory and no mount in it.
func (m *mgr) assertNoShimLeft(t testing.TB, id string) {
	t.Helper()
	if entries, _ := os.ReadDir(filepath.Join(m.state, "s")); len(entries) > 0 {
		t.Errorf("shim socket left in %s/s: %s", m.state, entries[0].Name())
	}
	d := shimStateDir(manager.Namespace, id)
	if dirExists(d) {
		t.Errorf("shim state directory %s left", d)
	}
	if mounts := mountedUnder(d); len(mounts) > 0 {
		t.Errorf("mounts left in the shim state directory: %v", mounts)
	}
}

// boxEvents reads event lines until one of box id has the topic last, and
// returns the box's task events in order (an exit as /tasks/exit=STATUS;
// health events left out).
func boxEvents(t testing.TB, lines <-chan string, id, last string) []string {
	t.Helper()
	var got []string
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("events ended before %s of %s: %q", last, id, got)
			}
			f := strings.Fields(l)
			if len(f) < 3 || f[2] != id || !strings.HasPrefix(f[1], "/tasks/") || f[1] == "/tasks/health" {
				continue
			}
			ev := f[1]
			if ev == "/tasks/exit" {
				ev += "=" + f[len(f)-1]
			}
			got = append(got, ev)
			if f[1] == last {
				return got
			}
		case <-timeout:
			t.Fatalf("no %s event of %s; got %q", last, id, got)
		}
	}
}

// assertNoEventsOf fails for any event line printed so far that names box
// id.
func assertNoEventsOf(t testing.TB, lines <-chan string, id string) {
	t.Helper()
	for {
		select {
		case l := <-lines:
			if strings.Contains(l, id) {
				t.Errorf("event for a box that never ran: %q", l)
			}
		default:
			return
		}
	}
}
