package integration

// Load, soak and backpressure figures through containerd (issue 11, "Load"):
// many boxes started and killed at once, a long run of short-lived boxes
// watched for leaks in the daemon that outlives them, and a box that writes
// far more output than its reader takes (load_backpressure_bench_test.go).
// Each benchmark measures once per test binary and reports the same figures
// on every invocation (make bench runs a benchmark function more than once:
// b.N = 1, then the -benchtime count), as BenchmarkIdleBoxes does: twenty
// VMs, two hundred cycles or a GiB of output need not be repeated to be
// believed, and a second round would double make bench's time. Failures (a
// box that did not start, a missing exit, a leak, lost output) fail the
// benchmark; they are never figures.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Sizes of the load benchmarks.
const (
	// loadBoxes is how many boxes BenchmarkContainerdLoad20 starts at once.
	loadBoxes = 20
	// loadStartTimeout bounds the parallel create+start of all of them
	// (two shared cores under TCG).
	loadStartTimeout = 10 * time.Minute
	// loadExitTimeout bounds how long every exit may take to arrive after
	// the kill.
	loadExitTimeout = 3 * time.Minute

	// soakCycles is how many create/start/exec/kill/delete cycles
	// BenchmarkContainerdSoak runs; soakSampleEvery how often it samples
	// containerd; soakWarmup the cycles before the reference sample.
	soakCycles      = 200
	soakSampleEvery = 10
	soakWarmup      = 20
	// soakFDSlackPct is how far above the post-warm-up value containerd's
	// descriptor count may go before the soak calls it a leak.
	soakFDSlackPct = 5.0
	// soakCycleTimeout bounds one cycle.
	soakCycleTimeout = 3 * time.Minute
)

// onceFigures holds a benchmark's figures, measured once per test binary.
type onceFigures struct {
	once sync.Once
	figs map[string]float64
}

// report measures (the first time) and reports the figures. A measurement
// that failed has failed the benchmark already and reports nothing.
func (o *onceFigures) report(b *testing.B, measure func(b *testing.B) map[string]float64) {
	o.once.Do(func() { o.figs = measure(b) })
	for _, k := range slices.Sorted(maps.Keys(o.figs)) {
		b.ReportMetric(o.figs[k], k)
	}
}

var loadFigures, soakBoxliteFigures, soakRuncFigures onceFigures

// newBox creates container id of testImage running args under runtime rt
// (with options opts) with the Go client and returns it with its task
// created (no stdio) and started, the task's exit channel and how long
// creation and start took. It never fails the benchmark itself: it runs on
// goroutines of its own.
func newBox(ctx context.Context, cl *client.Client, rt string, opts any, id string, args ...string) (box, error) {
	bx := box{id: id}
	began := time.Now()
	img, err := cl.GetImage(ctx, testImage)
	if err != nil {
		return bx, err
	}
	bx.ctr, err = cl.NewContainer(ctx, id, client.WithImage(img), client.WithNewSnapshot(id, img),
		client.WithRuntime(rt, opts), client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs(args...)))
	if err != nil {
		return bx, fmt.Errorf("new container %s: %w", id, err)
	}
	if bx.task, err = bx.ctr.NewTask(ctx, cio.NullIO); err != nil {
		return bx, fmt.Errorf("create task %s: %w", id, err)
	}
	// The exit channel outlives ctx: its context is the wait's own.
	if bx.exit, err = bx.task.Wait(nsCtx(context.Background())); err != nil {
		return bx, fmt.Errorf("wait %s: %w", id, err)
	}
	if err := bx.task.Start(ctx); err != nil {
		return bx, fmt.Errorf("start %s: %w", id, err)
	}
	bx.took = time.Since(began)
	return bx, nil
}

// box is one container with its task, made by newBox.
type box struct {
	id   string
	ctr  client.Container
	task client.Task
	exit <-chan client.ExitStatus
	took time.Duration
}

// remove deletes the box's task (killing it) and container, whatever
// exists of them, bounded; NotFound is success.
func (bx box) remove(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var errs []error
	if bx.task != nil {
		if _, err := bx.task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete task %s: %w", bx.id, err))
		}
	}
	if bx.ctr != nil {
		if err := bx.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete container %s: %w", bx.id, err))
		}
	}
	return errors.Join(errs...)
}

// percentile is the p-th percentile (nearest rank) of d.
func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p+99)/100 - 1
	return s[max(i, 0)]
}

// memAvailableKiB is the host's MemAvailable.
func memAvailableKiB() int { return procKiB("/proc/meminfo", "MemAvailable:") }

// openFDs is how many descriptors pid has open, or -1 (serve_test.go's
// fdCount fails a *testing.T instead).
func openFDs(pid int) int {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(fds)
}

// BenchmarkContainerdLoad20 starts 20 boxes (`sleep 1000`) at once through
// containerd's Go client, each container created, its task created and
// started on a goroutine of its own, and reports the p50 and p99 of that
// create+start, the wall time until all ran, and the host memory they use:
// the drop of MemAvailable and the total PSS of their shims and QEMUs. It
// then SIGKILLs all of them at once through the task API: every task's exit
// (137) must come back through Wait and as a /tasks/exit event (subscribed
// before the first box), every task and container must delete, and the
// harness's leak check must find nothing left. One box runs first so the
// shim's VM template of this shape exists (its build is not a start time).
func BenchmarkContainerdLoad20(b *testing.B) {
	loadFigures.report(b, measureLoad)
}

func measureLoad(b *testing.B) map[string]float64 {
	c := startContainerd(b)
	cl := c.goClient(b)
	if r := c.runRm(b, boxliteRuntime, nil, "true"); r.code != 0 {
		b.Fatalf("warm-up box: exit %d stderr %q", r.code, r.stderr)
	}
	ids := make([]string, loadBoxes)
	for i := range ids {
		ids[i] = c.newID(b, "load")
	}
	events := c.subscribe(b)
	memBefore := memAvailableKiB()

	boxes := make([]box, loadBoxes)
	errs := make([]error, loadBoxes)
	ctx, cancel := context.WithTimeout(nsCtx(context.Background()), loadStartTimeout)
	defer cancel()
	began := time.Now()
	var wg sync.WaitGroup
	for i := range boxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			boxes[i], errs[i] = newBox(ctx, cl, boxliteRuntime, nil, ids[i], "sleep", "1000")
		}()
	}
	wg.Wait()
	wall := time.Since(began)
	// Runs before the harness's leak check (cleanups run last first):
	// whatever a failure left is removed, so the check judges the rest.
	b.Cleanup(func() {
		for _, bx := range boxes {
			if err := bx.remove(nsCtx(context.Background())); err != nil {
				b.Error(err)
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		b.Fatalf("not every box started: %v", err)
	}
	var starts []time.Duration
	pss := 0
	for _, bx := range boxes {
		starts = append(starts, bx.took)
		pss += pssKiB(c.shimOf(b, bx.id)) + pssKiB(int(bx.task.Pid()))
	}
	memUsed := memBefore - memAvailableKiB()

	// All killed at once: each goroutine waits at the barrier, then kills.
	killed := time.Now()
	gate := make(chan struct{})
	for i, bx := range boxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			errs[i] = bx.task.Kill(nsCtx(context.Background()), syscall.SIGKILL)
		}()
	}
	close(gate)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatalf("kill: %v", err)
	}
	deadline := time.After(loadExitTimeout)
	var lastExit time.Duration
	for _, bx := range boxes {
		select {
		case st := <-bx.exit:
			if st.ExitCode() != 137 {
				b.Errorf("%s: exit %d (%v), want 137", bx.id, st.ExitCode(), st.Error())
			}
			lastExit = max(lastExit, time.Since(killed))
		case <-deadline:
			b.Fatalf("%s: no exit within %v of the kill", bx.id, loadExitTimeout)
		}
	}
	for _, bx := range boxes {
		if !events.waitFor(bx.id, "/tasks/exit=137", loadExitTimeout) {
			b.Errorf("%s: no /tasks/exit=137 event; its events: %s", bx.id, fmtEvents(events.of(bx.id)))
		}
	}
	deleted := time.Now()
	for i, bx := range boxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = bx.remove(nsCtx(context.Background()))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatalf("delete: %v", err)
	}
	for _, bx := range boxes {
		if !events.waitFor(bx.id, "/tasks/delete=137", loadExitTimeout) {
			b.Errorf("%s: no /tasks/delete=137 event; its events: %s", bx.id, fmtEvents(events.of(bx.id)))
		}
	}
	waitFor(b, settleTimeout, "every shim of the load gone", func() bool { return len(c.shims()) == 0 })
	teardown := time.Since(deleted)

	p50, p99 := percentile(starts, 50), percentile(starts, 99)
	fmt.Printf("\nload: %d boxes created+started at once through containerd (TCG, templates)\n", loadBoxes)
	fmt.Printf("%-44s %10.0f ms\n", "create+start p50", ms(p50))
	fmt.Printf("%-44s %10.0f ms\n", "create+start p99", ms(p99))
	fmt.Printf("%-44s %10.0f ms\n", "all running (wall)", ms(wall))
	fmt.Printf("%-44s %10.0f MiB (%.0f per box)\n", "host MemAvailable drop", float64(memUsed)/1024, float64(memUsed)/1024/loadBoxes)
	fmt.Printf("%-44s %10.0f MiB (%.0f per box)\n", "PSS of shims + QEMUs", float64(pss)/1024, float64(pss)/1024/loadBoxes)
	fmt.Printf("%-44s %10.0f ms\n", "SIGKILL of all -> last exit", ms(lastExit))
	fmt.Printf("%-44s %10.0f ms\n", "delete of all -> every shim gone", ms(teardown))
	return map[string]float64{
		"start20-p50-ms":         ms(p50),
		"start20-p99-ms":         ms(p99),
		"start20-wall-ms":        ms(wall),
		"host-mem-20-boxes-MiB":  float64(memUsed) / 1024,
		"pss-20-boxes-MiB":       float64(pss) / 1024,
		"kill20-last-exit-ms":    ms(lastExit),
		"delete20-shims-gone-ms": ms(teardown),
		"pss-per-box-MiB":        float64(pss) / 1024 / loadBoxes,
		"host-mem-per-box-MiB":   float64(memUsed) / 1024 / loadBoxes,
		"start20-p99/p50":        float64(p99) / float64(p50),
	}
}

// soakSample is containerd's state after a number of soak cycles: its
// open descriptors and VmRSS, split into anonymous memory (Go heap and
// stacks) and file pages (its binary, bolt's mmapped metadata database).
type soakSample struct {
	cycle, fds      int
	rss, anon, file int // KiB
	at              time.Duration
}

func sampleSoak(pid, cycle int, at time.Duration) soakSample {
	status := fmt.Sprintf("/proc/%d/status", pid)
	return soakSample{cycle: cycle, fds: openFDs(pid), rss: procKiB(status, "VmRSS:"),
		anon: procKiB(status, "RssAnon:"), file: procKiB(status, "RssFile:"), at: at}
}

// BenchmarkContainerdSoak runs 200 cycles of one box each through
// containerd's Go client: create, start (`sleep 1000`), exec `true` (exit 0
// required), SIGKILL (exit 137 required), delete task and container, then
// wait until every process of the box (shim, QEMU) has exited. Every 10
// cycles it samples containerd's open descriptors and RSS, and prints the
// curve. After a 20-cycle warm-up (the shim's template, containerd's caches
// and connection pools settle), descriptors more than 5% above the
// cycle-20 count at the end are a leak and fail the benchmark (the end, not
// the largest sample: a leak accumulates, while a descriptor containerd
// holds for a moment, in a sample taken with no box alive, is not one; the
// largest is reported). RSS is only reported (its largest deviation from
// the cycle-20 value, and its slope in KiB per 100 cycles, in total and
// anonymous): containerd's Go heap may grow to twice its live size between
// collections and freed pages go back to the kernel lazily, so RSS can move
// by more than 5% without any leak; a leak shows as a slope that does not
// flatten. The same cycles under runc, in a daemon of their own, are the
// baseline that tells containerd's own growth from what boxlite's shims
// cause (reported, never failed). At the end no process of the daemon's
// boxes and no shim state directory may be left (and the harness's leak
// check runs). Each runtime is a sub-benchmark, so its daemon and leak
// check end with it.
func BenchmarkContainerdSoak(b *testing.B) {
	// b.Run, not runOnce: a sub-benchmark too is called again with the
	// -benchtime count, and that call must report the figures.
	b.Run("runc", func(b *testing.B) {
		soakRuncFigures.report(b, func(b *testing.B) map[string]float64 { return measureSoak(b, runcRuntime) })
	})
	b.Run("boxlite", func(b *testing.B) {
		soakBoxliteFigures.report(b, func(b *testing.B) map[string]float64 { return measureSoak(b, boxliteRuntime) })
	})
}

func measureSoak(b *testing.B, rt string) map[string]float64 {
	c := startContainerd(b)
	cl := c.goClient(b)
	pid := c.pid()
	began := time.Now()
	samples := []soakSample{sampleSoak(pid, 0, 0)}
	var cycles []time.Duration
	for i := 1; i <= soakCycles; i++ {
		id := c.newID(b, "soak-"+shortRuntime(rt))
		t0 := time.Now()
		if err := soakCycle(cl, rt, c.plainOptions(rt), id); err != nil {
			b.Fatalf("cycle %d: %v", i, err)
		}
		waitFor(b, settleTimeout, "every process of "+id+" gone", func() bool { return len(c.strays()) == 0 })
		cycles = append(cycles, time.Since(t0))
		if i%soakSampleEvery == 0 {
			samples = append(samples, sampleSoak(pid, i, time.Since(began)))
		}
	}
	total := time.Since(began)
	leftDirs := 0
	for d := range c.shimStateDirs() {
		if dirExists(d) {
			leftDirs++
		}
	}
	leftProcs := len(c.strays())

	after := samples[soakWarmup/soakSampleEvery:]
	ref, end := after[0], samples[len(samples)-1]
	pct := func(v, ref int) float64 { return 100 * float64(v-ref) / float64(ref) }
	var fdMax, rssDev float64
	fmt.Printf("\nsoak, %s: %d create/start/exec/kill/delete cycles through containerd; containerd's fds and RSS\n", rt, soakCycles)
	fmt.Printf("%6s %8s %5s %9s %9s %9s %8s\n", "cycle", "elapsed", "fds", "RSS KiB", "anon", "file", "RSS dev")
	for _, s := range samples {
		dev := ""
		if s.cycle >= ref.cycle {
			fdMax, rssDev = max(fdMax, pct(s.fds, ref.fds)), max(rssDev, abs(pct(s.rss, ref.rss)))
			dev = fmt.Sprintf("%+.1f%%", pct(s.rss, ref.rss))
		}
		fmt.Printf("%6d %7.0fs %5d %9d %9d %9d %8s\n", s.cycle, s.at.Seconds(), s.fds, s.rss, s.anon, s.file, dev)
	}
	fdEnd := pct(end.fds, ref.fds)
	slope := slopePer100(after, func(s soakSample) int { return s.rss })
	anonSlope := slopePer100(after, func(s soakSample) int { return s.anon })
	fmt.Printf("%s after warm-up (cycle %d): fds %+.1f%% at the end (at most %+.1f%%); RSS at most %.1f%% away, "+
		"slope %+.0f KiB per 100 cycles (anonymous %+.0f); cycle median %v, total %v; %d processes and %d shim state dirs left\n",
		shortRuntime(rt), ref.cycle, fdEnd, fdMax, rssDev, slope, anonSlope, median(cycles).Round(time.Millisecond),
		total.Round(time.Second), leftProcs, leftDirs)
	if rssDev > soakFDSlackPct {
		fmt.Printf("soak, %s: containerd's RSS moved %.1f%% (> %.0f%%) after warm-up: reported, not failed (a GC-paced heap; see the slope)\n",
			rt, rssDev, soakFDSlackPct)
	}
	if rt == boxliteRuntime && fdEnd > soakFDSlackPct {
		b.Errorf("containerd's descriptors grew %.1f%% after warm-up (%d at cycle %d, %d at the end): a leak",
			fdEnd, ref.fds, ref.cycle, end.fds)
	}
	if leftProcs != 0 || leftDirs != 0 {
		b.Errorf("%d processes and %d shim state directories left after the soak", leftProcs, leftDirs)
	}
	return map[string]float64{
		"fd-growth-end-%":           fdEnd,
		"fd-growth-max-%":           fdMax,
		"rss-dev-max-%":             rssDev,
		"rss-slope-KiB/100cyc":      slope,
		"rss-anon-slope-KiB/100cyc": anonSlope,
		"cycle-ms/median":           ms(median(cycles)),
		"total-s":                   total.Seconds(),
		"fds-end":                   float64(end.fds),
		"rss-end-MiB":               float64(end.rss) / 1024,
	}
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// slopePer100 is the least-squares slope of v over the samples' cycles, in
// KiB per 100 cycles.
func slopePer100(s []soakSample, v func(soakSample) int) float64 {
	n := float64(len(s))
	var sx, sy, sxx, sxy float64
	for _, p := range s {
		x, y := float64(p.cycle), float64(v(p))
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	d := n*sxx - sx*sx
	if d == 0 {
		return 0
	}
	return 100 * (n*sxy - sx*sy) / d
}

// soakCycle runs one box through its whole life: create, start, exec true,
// SIGKILL, delete. Whatever a failure leaves is removed.
func soakCycle(cl *client.Client, rt string, opts any, id string) (retErr error) {
	ctx, cancel := context.WithTimeout(nsCtx(context.Background()), soakCycleTimeout)
	defer cancel()
	bx, err := newBox(ctx, cl, rt, opts, id, "sleep", "1000")
	defer func() {
		if retErr != nil {
			bx.remove(nsCtx(context.Background()))
		}
	}()
	if err != nil {
		return err
	}
	pspec := &specs.Process{Args: []string{"true"}, Cwd: "/", Env: []string{"PATH=/bin:/usr/bin"}}
	p, err := bx.task.Exec(ctx, "true", pspec, cio.NullIO)
	if err != nil {
		return fmt.Errorf("exec: %w", err)
	}
	pexit, err := p.Wait(ctx)
	if err != nil {
		return fmt.Errorf("wait exec: %w", err)
	}
	if err := p.Start(ctx); err != nil {
		return fmt.Errorf("start exec: %w", err)
	}
	select {
	case st := <-pexit:
		if st.ExitCode() != 0 {
			return fmt.Errorf("exec true: exit %d (%v)", st.ExitCode(), st.Error())
		}
	case <-ctx.Done():
		return fmt.Errorf("exec true: no exit: %w", ctx.Err())
	}
	if _, err := p.Delete(ctx); err != nil {
		return fmt.Errorf("delete exec: %w", err)
	}
	if err := bx.task.Kill(ctx, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill: %w", err)
	}
	select {
	case st := <-bx.exit:
		if st.ExitCode() != 137 {
			return fmt.Errorf("exit %d (%v), want 137", st.ExitCode(), st.Error())
		}
	case <-ctx.Done():
		return fmt.Errorf("no exit after SIGKILL: %w", ctx.Err())
	}
	if _, err := bx.task.Delete(ctx); err != nil {
		return fmt.Errorf("delete task: %w", err)
	}
	if err := bx.ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		return fmt.Errorf("delete container: %w", err)
	}
	return nil
}
