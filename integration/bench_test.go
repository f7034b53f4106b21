package integration

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/vmm"
)

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// rssKiB reads VmRSS of pid.
func rssKiB(pid int) int {
	return procKiB(fmt.Sprintf("/proc/%d/status", pid), "VmRSS:")
}

// procKiB reads the "key N kB" line of a /proc file, or 0.
func procKiB(path, key string) int {
	data, _ := os.ReadFile(path)
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, key) {
			n, _ := strconv.Atoi(strings.Fields(l)[1])
			return n
		}
	}
	return 0
}

// BenchmarkGuestBootVsFloor measures, in the same run, the floor (a bare
// QEMU boot of the same kernel to a trivial /init that reboots at once, launch
// to VMM exit) and boxlite's boot (launch to agent ready), alternating them,
// and reports medians, the overhead ratio, and the VMM's RSS once ready.
func BenchmarkGuestBootVsFloor(b *testing.B) {
	rootfs := busyboxRootfs(b)
	floorInitrd := rawInitrd(b, "#!/bin/busybox sh\n/bin/busybox reboot -f\n")
	var floors, readies []time.Duration
	var rss []int
	for i := 0; i < b.N; i++ {
		floors = append(floors, bareBoot(b, rootfs, floorInitrd))
		sb, err := sandbox.Start(context.Background(), sandboxConfig(b, rootfs, vmOpts{}))
		if err != nil {
			b.Fatal(err)
		}
		readies = append(readies, sb.BootTime)
		rss = append(rss, rssKiB(sb.Identity().Pid))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := sb.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		cancel()
	}
	sort.Ints(rss)
	f, r := median(floors), median(readies)
	b.ReportMetric(ms(f), "floor-ms")
	b.ReportMetric(ms(r), "ready-ms")
	b.ReportMetric(float64(r)/float64(f), "ready/floor")
	b.ReportMetric(float64(rss[len(rss)/2])/1024, "vmm-rss-MiB")
	assertNoLeaks(b, 0, rootfs)
}

// bareBoot boots the kernel with initrd and returns launch to VMM exit.
func bareBoot(b *testing.B, rootfs, initrd string) time.Duration {
	b.Helper()
	q, err := vmm.NewQEMU(vmm.Config{Kernel: kernelPath, Initrd: initrd, Share: rootfs, StateDir: shortTempDir(b)})
	if err != nil {
		b.Fatal(err)
	}
	began := time.Now()
	if err := q.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := q.Wait(ctx); err != nil {
		q.Kill()
		b.Fatal(err)
	}
	return time.Since(began)
}

// BenchmarkGuestProcessStart measures create+start of `true` to its exit in a
// booted VM (crun in the guest under TCG), and split into the agent calls.
func BenchmarkGuestProcessStart(b *testing.B) {
	rootfs := busyboxRootfs(b)
	sb := startSandbox(b, rootfs, vmOpts{})
	var lat, start, exit, del []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id := "p" + strconv.Itoa(i)
		spec := newSpec(b, id, []string{"true"})
		began := time.Now()
		res := runBox(b, sb, id, spec, nil)
		lat = append(lat, time.Since(began))
		if res.exit.ExitStatus != 0 {
			b.Fatalf("exit %d", res.exit.ExitStatus)
		}
		start, exit, del = append(start, res.took.start), append(exit, res.took.exit), append(del, res.took.delete)
	}
	b.StopTimer()
	b.ReportMetric(ms(median(lat)), "start-to-exit-ms")
	b.ReportMetric(ms(median(start)), "create+start-ms")
	b.ReportMetric(ms(median(exit)), "exit-ms")
	b.ReportMetric(ms(median(del)), "delete-ms")
}
