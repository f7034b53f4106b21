package reaper

import (
	"context"
	"os"
	"os/exec"
	"sort"
	"syscall"
	"testing"
	"time"
)

// BenchmarkZombieLifetime measures how long an exited child stays a zombie
// before the SIGCHLD loop reaps it: from the moment its stdout pipe closes
// (the kernel closes files in do_exit before the task becomes a zombie) to
// the reaper's exit timestamp. Reports the median.
func BenchmarkZombieLifetime(b *testing.B) {
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("/bin/true")
		cmd.Stdout = w
		p, err := Default().Start(cmd)
		w.Close()
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 1)
		r.Read(buf) // returns at EOF: the child closed its files while exiting
		closed := time.Now()
		r.Close()
		e, err := p.Wait(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, max(e.Time.Sub(closed), 0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "zombie-µs/median")
}

// BenchmarkReapCPU measures this process's CPU time (user+system, from
// getrusage) per started-and-reaped child, fork and exec included.
func BenchmarkReapCPU(b *testing.B) {
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p, err := Default().Start(exec.Command("/bin/true"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Wait(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	cpu := time.Duration(after.Utime.Nano()+after.Stime.Nano()-before.Utime.Nano()-before.Stime.Nano()) * time.Nanosecond
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/child")
}
