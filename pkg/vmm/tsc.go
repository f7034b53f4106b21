package vmm

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Under TCG the guest's rdtsc reads the host's TSC, but the guest kernel
// still calibrates its frequency against the emulated PIT. When several
// guests boot at once their vCPU threads are starved, the calibration fails
// ("Unable to calibrate against PIT"), the kernel marks the TSC unstable and
// falls back to jiffies: its clock then runs at the rate its starved timer
// interrupts arrive (a guest's `sleep 1000` once took 14.5 minutes) and it
// ticks periodically again even when idle. Measured with ten guests booting
// together: 10 of 10 fell back to refined-jiffies; told the frequency with
// tsc_early_khz alone, 10 of 10 still lost the TSC to the jiffies-based
// clocksource watchdog; with tsc=reliable as well, 10 of 10 kept it.

// clockArgsMax is the room the command line keeps for guestClockArgs.
const clockArgsMax = 48

// tscWindow is how long hostTSCkHz counts host TSC cycles.
const tscWindow = 10 * time.Millisecond

var tscOnce struct {
	sync.Once
	khz int64
}

// guestClockArgs are the kernel parameters that give a TCG guest the host's
// TSC frequency and keep the TSC as its clocksource; none under KVM (the
// guest has kvm-clock) or when the host's TSC is not invariant.
func guestClockArgs(accel Accel) []string {
	if accel != AccelTCG {
		return nil
	}
	tscOnce.Do(func() {
		info, err := os.ReadFile(cpuInfoPath)
		if err != nil || !invariantTSC(info) {
			log.L.Debug("host TSC is not invariant: TCG guests calibrate their own")
			return
		}
		tscOnce.khz = cachedTSCkHz(tscCachePath)
	})
	if tscOnce.khz <= 0 {
		return nil
	}
	return []string{"tsc_early_khz=" + strconv.FormatInt(tscOnce.khz, 10), "tsc=reliable"}
}

// tscCachePath keeps the measurement for the rest of the host's boot: every
// box has a shim process of its own, and each would otherwise spend
// tscWindow of its start measuring the same figure.
var tscCachePath = "/run/boxlite/tsc-khz"

// Plausible TSC frequencies; a cached figure outside is measured again.
const minTSCkHz, maxTSCkHz = 100_000, 20_000_000

// cachedTSCkHz returns the TSC frequency recorded in path for this boot
// ("<boot id> <kHz>"), else measures it and records it there.
func cachedTSCkHz(path string) int64 {
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	id := strings.TrimSpace(string(boot))
	if b, err := os.ReadFile(path); err == nil && id != "" {
		if f := strings.Fields(string(b)); len(f) == 2 && f[0] == id {
			if khz, err := strconv.ParseInt(f[1], 10, 64); err == nil && khz >= minTSCkHz && khz <= maxTSCkHz {
				return khz
			}
		}
	}
	khz := hostTSCkHz()
	if khz < minTSCkHz || khz > maxTSCkHz || id == "" {
		return khz
	}
	// Written whole and renamed: a concurrent reader sees the old file or
	// the new one. A failure only costs the next shim a measurement.
	tmp := path + "." + strconv.Itoa(os.Getpid())
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err == nil &&
		os.WriteFile(tmp, []byte(id+" "+strconv.FormatInt(khz, 10)+"\n"), 0o644) == nil {
		if os.Rename(tmp, path) != nil {
			os.Remove(tmp)
		}
	}
	return khz
}

// invariantTSC says /proc/cpuinfo's first flags line has constant_tsc and
// nonstop_tsc: the TSC ticks at one rate in every P- and C-state.
func invariantTSC(cpuinfo []byte) bool {
	for _, line := range bytes.Split(cpuinfo, []byte("\n")) {
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok || string(bytes.TrimSpace(k)) != "flags" {
			continue
		}
		var constant, nonstop bool
		for _, f := range bytes.Fields(v) {
			constant = constant || string(f) == "constant_tsc"
			nonstop = nonstop || string(f) == "nonstop_tsc"
		}
		return constant && nonstop
	}
	return false
}

// hostTSCkHz measures the host's TSC frequency against CLOCK_MONOTONIC_RAW
// (which the host kernel itself derives from the TSC), rounded to the MHz so
// that repeated measurements agree and a VM template keyed by the command
// line is found again: the rounding costs at most 0.5 MHz, 0.02% at 2.3 GHz.
func hostTSCkHz() int64 {
	c0, t0 := tscSample()
	time.Sleep(tscWindow)
	c1, t1 := tscSample()
	ns := t1 - t0
	if ns <= 0 || c1 <= c0 {
		return 0
	}
	khz := float64(c1-c0) / float64(ns) * 1e6
	return int64(khz/1000+0.5) * 1000
}

// tscSample reads the TSC and CLOCK_MONOTONIC_RAW together: of a few tries
// it keeps the one whose two TSC reads around the clock read are closest, so
// a preemption between them cannot skew the pair.
func tscSample() (tsc uint64, ns int64) {
	best := ^uint64(0)
	for i := 0; i < 5; i++ {
		var ts unix.Timespec
		a := rdtsc()
		if unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, &ts) != nil {
			return 0, 0
		}
		b := rdtsc()
		if b-a < best {
			best, tsc, ns = b-a, a+(b-a)/2, ts.Nano()
		}
	}
	return tsc, ns
}

// rdtsc reads the time-stamp counter (tsc_amd64.s).
func rdtsc() uint64
