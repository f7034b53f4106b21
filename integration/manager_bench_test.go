package integration

import (
	"testing"
	"time"
)

// BenchmarkManager measures the thin manager over the real shim: the wall
// time of `boxlite run --rm true` (median), the RSS of a running box's shim
// and VMM, and the latency from a SIGKILL of a box's process (boxlite kill)
// to its /tasks/exit event at `boxlite events` (median).
func BenchmarkManager(b *testing.B) {
	m := newMgr(b)
	var runs, kills []time.Duration
	var shimRSS, vmmRSS int
	lines := m.events()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "true"); r.code != 0 {
			b.Fatalf("run --rm true: %v", r)
		}
		runs = append(runs, time.Since(start))

		id := m.runD("--", "sleep", "1000")
		shim, vmm := m.pids(id)
		shimRSS, vmmRSS = max(shimRSS, rssKiB(shim)), max(vmmRSS, rssKiB(vmm))
		start = time.Now()
		m.ok("kill", "-s", "KILL", id)
		waitEvent(b, lines, "/tasks/exit", id)
		kills = append(kills, time.Since(start))
		m.ok("rm", id)
		waitGone(b, "shim", shim)
	}
	b.ReportMetric(ms(median(runs)), "run-rm-true-ms/median")
	b.ReportMetric(float64(shimRSS)/1024, "shim-RSS-MiB")
	b.ReportMetric(float64(vmmRSS)/1024, "VMM-RSS-MiB")
	b.ReportMetric(ms(median(kills)), "kill-to-exit-event-ms/median")
}
