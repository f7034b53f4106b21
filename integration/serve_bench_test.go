package integration

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
)

// serveBenchBoxes is how many boxes the daemon benchmark starts at once.
const serveBenchBoxes = 20

// BenchmarkServe measures boxlite serve against the local CLI, in one run:
//   - create+start+wait+remove of `true` over REST (pkg/client) against
//     `boxlite run --rm true` locally (medians, and their ratio);
//   - 20 concurrent creates through the daemon: all must succeed; p50 and
//     p99 of their latencies;
//   - the daemon's RSS with 0 and with 20 running boxes;
//   - the daemon's CPU per box per health probe, with the 20 boxes probed
//     every second (the shims probe; the daemon receives what they publish).
func BenchmarkServe(b *testing.B) {
	m := newMgr(b)
	d := m.serve(nil)
	c := d.c
	ctx := context.Background()
	var rest, cli []time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		id, err := c.Create(ctx, api.CreateRequest{Rootfs: m.rootfs, Cmd: []string{"true"}})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Start(ctx, id); err != nil {
			b.Fatal(err)
		}
		if e, err := c.Wait(ctx, id); err != nil || e.Status != 0 {
			b.Fatalf("wait: %v %v", e, err)
		}
		if err := c.Remove(ctx, id, true); err != nil {
			b.Fatal(err)
		}
		rest = append(rest, time.Since(start))

		start = time.Now()
		if r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "true"); r.code != 0 {
			b.Fatalf("run --rm true: %v", r)
		}
		cli = append(cli, time.Since(start))
	}
	b.ReportMetric(ms(median(rest)), "rest-create-start-wait-rm-ms/median")
	b.ReportMetric(ms(median(cli)), "cli-run-rm-ms/median")
	b.ReportMetric(float64(median(rest))/float64(median(cli)), "rest/cli")

	rss0 := rssKiB(d.Pid())
	// 20 boxes created at once, each health-probed every second.
	hz := clockTicks(b)
	var mu sync.Mutex
	var creates []time.Duration
	var ids []string
	var wg sync.WaitGroup
	errs := make(chan error, serveBenchBoxes)
	for i := 0; i < serveBenchBoxes; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			req := sleepBox(m.rootfs)
			req.HealthCheck = &api.HealthCheck{Interval: "1s", StartPeriod: "0s"}
			id, err := c.Create(ctx, req)
			if err == nil {
				err = c.Start(ctx, id)
			}
			mu.Lock()
			defer mu.Unlock()
			if id != "" {
				ids = append(ids, id)
			}
			if err != nil {
				errs <- err
				return
			}
			creates = append(creates, time.Since(start))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Errorf("concurrent create: %v", err)
	}
	if b.Failed() {
		return
	}
	// Every box healthy: its probes answer.
	waitHealthy(b, c, serveBenchBoxes)
	rss20 := rssKiB(d.Pid())
	var shims []int
	for _, id := range ids {
		bx, err := c.Inspect(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		shims = append(shims, bx.ShimPid)
	}
	shimCPU := func() (sum time.Duration) {
		for _, pid := range shims {
			sum += cpuTime(b, pid, hz)
		}
		return sum
	}
	// A measurement window, not a wait for a condition.
	const window = 20 * time.Second
	cpu0, shim0, t0 := cpuTime(b, d.Pid(), hz), shimCPU(), time.Now()
	time.Sleep(window)
	cpu, shimUsed, elapsed := cpuTime(b, d.Pid(), hz)-cpu0, shimCPU()-shim0, time.Since(t0)
	probes := float64(serveBenchBoxes) * elapsed.Seconds() // one per box per second
	for _, id := range ids {
		if err := c.Remove(ctx, id, true); err != nil {
			b.Errorf("remove %s: %v", id, err)
		}
	}
	slices.Sort(creates)
	b.ReportMetric(ms(creates[len(creates)/2]), "create20-p50-ms")
	b.ReportMetric(ms(creates[(len(creates)*99+99)/100-1]), "create20-p99-ms")
	b.ReportMetric(float64(rss0)/1024, "daemon-RSS-0-boxes-MiB")
	b.ReportMetric(float64(rss20)/1024, "daemon-RSS-20-boxes-MiB")
	b.ReportMetric(float64(cpu.Microseconds())/probes, "daemon-CPU-µs/box/probe")
	b.ReportMetric(float64(shimUsed.Microseconds())/probes, "shim-CPU-µs/box/probe")
	fmt.Printf("serve: %d concurrent creates all succeeded; over %v with %d boxes probed every 1s: daemon CPU %v, shims' CPU %v (clock tick %v)\n",
		len(creates), elapsed.Round(time.Millisecond), serveBenchBoxes, cpu, shimUsed, time.Duration(float64(time.Second)/hz))
}
