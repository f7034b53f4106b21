package integration

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkContainerdRunRm measures, in the same run and alternating,
// `ctr run --rm IMAGE ID true` and `... echo hi` under boxlite and runc
// (wall time of the ctr command, from exec to exit), and reports medians and
// the boxlite/runc ratios. It then measures an idle box: the shim's and the
// VMM's RSS, and `ctr task exec` latency (output to a log file: FIFO execs
// hang, see TestContainerdTaskExecMatchesRunc).
func BenchmarkContainerdRunRm(b *testing.B) {
	c := startContainerd(b)
	cmds := []struct {
		name string
		args []string
	}{{"true", []string{"true"}}, {"echo", []string{"echo", "hi"}}}
	times := map[string][]time.Duration{}
	for i := 0; i < b.N; i++ {
		for _, cmd := range cmds {
			for _, rt := range []string{boxliteRuntime, runcRuntime} {
				r := c.runRm(b, rt, nil, cmd.args...)
				if r.code != 0 {
					b.Fatalf("%s %s: exit %d stderr %q", rt, cmd.name, r.code, r.stderr)
				}
				key := shortRuntime(rt) + "-" + cmd.name
				times[key] = append(times[key], r.elapsed)
			}
		}
	}
	for _, cmd := range cmds {
		bx, rc := median(times["bx-"+cmd.name]), median(times["runc-"+cmd.name])
		b.ReportMetric(ms(bx), "bx-"+cmd.name+"-ms")
		b.ReportMetric(ms(rc), "runc-"+cmd.name+"-ms")
		b.ReportMetric(float64(bx)/float64(rc), "bx/runc-"+cmd.name)
	}

	id := c.runDetached(b, boxliteRuntime, []string{"--null-io"}, "sleep", "1000")
	defer c.killAndDelete(b, id)
	var execs []time.Duration
	for i := 0; i < 5; i++ {
		r, ok := c.startCtr(b, nil, "task", "exec", "--log-uri", "file://"+filepath.Join(c.dir, "bench-exec.log"),
			"--exec-id", fmt.Sprintf("b%d", i), id, "true").waitFor(execTimeout)
		if !ok || r.code != 0 {
			b.Fatalf("exec: finished %v exit %d stderr %q", ok, r.code, r.stderr)
		}
		execs = append(execs, r.elapsed)
	}
	b.ReportMetric(ms(median(execs)), "bx-exec-ms")
	time.Sleep(time.Second) // idle
	b.ReportMetric(float64(rssKiB(c.shimOf(b, id)))/1024, "shim-rss-MiB")
	b.ReportMetric(float64(rssKiB(c.taskPid(b, id)))/1024, "vmm-rss-MiB")
}

// BenchmarkContainerdRunRmNetwork measures `ctr run --rm true` with a
// network (the box joins a namespace the test wired: a veth with an
// address, so Start wires a tap and configures the guest's interface)
// against the same without one (a new empty namespace: a tap that stays
// unwired), and runc in the same wired namespace as the baseline, in the
// same run and alternating. Medians and ratios.
func BenchmarkContainerdRunRmNetwork(b *testing.B) {
	c := startContainerd(b)
	tn := newTestNet(b)
	tn.wire(b)
	withNet := []string{"--with-ns", "network:" + tn.boxPath}
	runs := []struct {
		key   string
		rt    string
		flags []string
	}{
		{"bx-nonet", boxliteRuntime, nil},
		{"bx-net", boxliteRuntime, withNet},
		{"runc-net", runcRuntime, withNet},
	}
	times := map[string][]time.Duration{}
	for i := 0; i < b.N; i++ {
		for _, r := range runs {
			res := c.runRm(b, r.rt, r.flags, "true")
			if res.code != 0 {
				b.Fatalf("%s: exit %d stderr %q", r.key, res.code, res.stderr)
			}
			times[r.key] = append(times[r.key], res.elapsed)
		}
	}
	fmt.Printf("\nctr run --rm true, median of %d\n", b.N)
	for _, r := range runs {
		m := median(times[r.key])
		fmt.Printf("%-10s %8.0f ms\n", r.key, ms(m))
		b.ReportMetric(ms(m), r.key+"-ms")
	}
	b.ReportMetric(float64(median(times["bx-net"]))/float64(median(times["bx-nonet"])), "bx-net/nonet")
	b.ReportMetric(float64(median(times["bx-net"]))/float64(median(times["runc-net"])), "bx/runc-net")
	tn.assertUnwired(b)
}
