package integration

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Idle benchmark sizes: the window over which CPU is measured, how many
// boxes run at once, and how many boot at a time (so the host stays usable
// while they boot).
const (
	idleWindow   = 30 * time.Second
	idleBoxes    = 50
	idleBootRate = 10
)

// idleResult is measured once per process: make bench runs a benchmark
// function more than once (b.N = 1, then the -benchtime count), and fifty
// VMs need not boot twice.
var (
	idleOnce   sync.Once
	idleResult map[string]float64
	idleErr    error
)

// BenchmarkIdleBoxes measures what idle boxes cost (issue 10: an idle box
// must cost at most 0.3% of a core under TCG): the CPU of one idle box's
// QEMU and shim, health checks on as by default, over a 30 s window; then 50
// idle boxes at once: their total CPU and PSS, and how long the host takes
// to fork and exec /bin/true meanwhile (median and worst), against the same
// with no box running.
func BenchmarkIdleBoxes(b *testing.B) {
	idleOnce.Do(func() { idleResult, idleErr = measureIdle(b) })
	if idleErr != nil {
		b.Fatal(idleErr)
	}
	keys := make([]string, 0, len(idleResult))
	for k := range idleResult {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		b.ReportMetric(idleResult[k], k)
	}
}

func measureIdle(b *testing.B) (map[string]float64, error) {
	m := newMgr(b)
	d := m.serve(nil)
	c := d.c
	ctx := context.Background()
	hz := clockTicks(b)
	out := map[string]float64{}

	baseExec := execLatencies(b, 50)
	one := serveBox(b, c, sleepBox(m.rootfs))
	waitHealthy(b, c, 1)
	cpu := windowCPU(b, hz, []int{one.VMMPid, one.ShimPid})
	out["idle-1-box-%core"] = 100 * cpu.Seconds() / idleWindow.Seconds()
	if err := c.Remove(ctx, one.ID, true); err != nil {
		return nil, err
	}

	var mu sync.Mutex
	var boxes []api.Box
	var errs []error
	sem := make(chan struct{}, idleBootRate)
	var wg sync.WaitGroup
	for i := 0; i < idleBoxes; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			id, err := c.Create(ctx, sleepBox(m.rootfs))
			if err == nil {
				err = c.Start(ctx, id)
			}
			var bx api.Box
			if err == nil {
				bx, err = c.Inspect(ctx, id)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			} else {
				boxes = append(boxes, bx)
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, bx := range boxes {
			c.Remove(ctx, bx.ID, true)
		}
	}()
	if len(errs) > 0 {
		return nil, fmt.Errorf("%d of %d boxes failed to start, first: %v", len(errs), idleBoxes, errs[0])
	}
	waitHealthy(b, c, idleBoxes)
	var pids []int
	pss := 0
	for _, bx := range boxes {
		pids = append(pids, bx.VMMPid, bx.ShimPid)
		pss += pssKiB(bx.VMMPid) + pssKiB(bx.ShimPid)
	}
	var loaded []time.Duration
	var cpu50 time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		cpu50 = windowCPU(b, hz, pids)
	}()
	for {
		select {
		case <-done:
		default:
			loaded = append(loaded, execLatencies(b, 1)...)
			time.Sleep(200 * time.Millisecond) // spread the probes over the window
			continue
		}
		break
	}
	out["idle-50-boxes-%core"] = 100 * cpu50.Seconds() / idleWindow.Seconds()
	out["idle-50-boxes-PSS-MiB"] = float64(pss) / 1024
	out["idle-PSS-per-box-MiB"] = float64(pss) / 1024 / idleBoxes
	out["host-exec-true-ms/median-0-boxes"] = ms(median(baseExec))
	out["host-exec-true-ms/median-50-boxes"] = ms(median(loaded))
	out["host-exec-true-ms/max-50-boxes"] = ms(slices.Max(loaded))
	fmt.Printf("idle: one box %.2f%% of a core; %d boxes %.1f%% of a core, %.0f MiB PSS; exec of true %v median (%v with no box), %v worst\n",
		out["idle-1-box-%core"], idleBoxes, out["idle-50-boxes-%core"], out["idle-50-boxes-PSS-MiB"],
		median(loaded).Round(10*time.Microsecond), median(baseExec).Round(10*time.Microsecond), slices.Max(loaded).Round(10*time.Microsecond))
	return out, nil
}

// windowCPU is the CPU pids used over idleWindow (a measurement window,
// not a wait for a condition).
func windowCPU(b *testing.B, hz float64, pids []int) time.Duration {
	sum := func() (t time.Duration) {
		for _, pid := range pids {
			t += cpuTime(b, pid, hz)
		}
		return t
	}
	before := sum()
	time.Sleep(idleWindow)
	return sum() - before
}

// waitHealthy waits until n boxes of c are running and healthy (their
// probes answer: the guests have booted and settled).
func waitHealthy(b *testing.B, c api.Boxes, n int) {
	b.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		boxes, err := c.List(context.Background(), api.ListFilter{Status: []string{"running"}})
		if err != nil {
			b.Fatal(err)
		}
		healthy := 0
		for _, bx := range boxes {
			if bx.Health == "healthy" {
				healthy++
			}
		}
		if healthy >= n {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d boxes healthy after 5 minutes", healthy, n)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// execLatencies forks and execs /bin/true n times and returns how long
// each took, start to reaped.
func execLatencies(b *testing.B, n int) []time.Duration {
	var out []time.Duration
	for i := 0; i < n; i++ {
		start := time.Now()
		p, err := reaper.Default().Start(exec.Command("/bin/true"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Wait(context.Background()); err != nil {
			b.Fatal(err)
		}
		out = append(out, time.Since(start))
	}
	return out
}

// pssKiB is a process's proportional set size.
func pssKiB(pid int) int {
	return procKiB(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss:")
}
