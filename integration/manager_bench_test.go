package integration

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

// atClkTck is the auxiliary vector entry holding the clock tick rate, what
// sysconf(_SC_CLK_TCK) returns.
const atClkTck = 17

// clockTicks returns the kernel's clock tick rate (USER_HZ) from the
// auxiliary vector, as sysconf(_SC_CLK_TCK) does; never assumed to be 100.
func clockTicks(b testing.TB) float64 {
	auxv, err := unix.Auxv()
	if err != nil {
		b.Fatal(err)
	}
	for _, kv := range auxv {
		if kv[0] == atClkTck && kv[1] > 0 {
			return float64(kv[1])
		}
	}
	b.Fatal("no AT_CLKTCK in the auxiliary vector")
	return 0
}

// cpuTime returns the user+system CPU time pid has used.
func cpuTime(b testing.TB, pid int, hz float64) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which may hold spaces: utime and
	// stime are fields 14 and 15, so 12 and 13 here.
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+2:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return time.Duration(float64(ut+st) / hz * float64(time.Second))
}

// BenchmarkHealthTick measures what a health check costs: two boxes run in
// the same window, one probed every 50 ms and one with --no-health-check;
// the difference in their shims' and VMMs' CPU time, divided by the probes
// made, is the CPU per tick. Each window starts once the checked box is
// healthy. Reported as medians, with the cost per second of a box at the
// default 30 s interval.
func BenchmarkHealthTick(b *testing.B) {
	const interval, window = 50 * time.Millisecond, 5 * time.Second
	hz := clockTicks(b)
	m := newMgr(b)
	lines := m.events()
	on := m.runD("--health-interval", interval.String(), "--health-start-period", "0s", "--", "sleep", "1000")
	off := m.runD("--no-health-check", "--", "sleep", "1000")
	for {
		if f := waitEvent(b, lines, "/tasks/health", on); f[len(f)-1] == "healthy" {
			break
		}
	}
	shimOn, vmmOn := m.pids(on)
	shimOff, vmmOff := m.pids(off)
	var shimPerTick, vmmPerTick []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s0, v0 := cpuTime(b, shimOn, hz)-cpuTime(b, shimOff, hz), cpuTime(b, vmmOn, hz)-cpuTime(b, vmmOff, hz)
		time.Sleep(window)
		s1, v1 := cpuTime(b, shimOn, hz)-cpuTime(b, shimOff, hz), cpuTime(b, vmmOn, hz)-cpuTime(b, vmmOff, hz)
		ticks := int64(window / interval)
		shimPerTick = append(shimPerTick, (s1-s0)/time.Duration(ticks))
		vmmPerTick = append(vmmPerTick, (v1-v0)/time.Duration(ticks))
	}
	b.StopTimer()
	if got := m.inspect(on, "{{.Health}}"); got != "healthy" {
		b.Errorf("checked box ended %q, want healthy", got)
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }
	b.ReportMetric(us(median(shimPerTick)), "shim-cpu-µs/tick")
	b.ReportMetric(us(median(vmmPerTick)), "vmm-cpu-µs/tick")
	b.ReportMetric((us(median(shimPerTick))+us(median(vmmPerTick)))/30, "cpu-µs/s-per-box@30s")
	m.ok("rm", "--force", on)
	m.ok("rm", "--force", off)
}
