package vmm

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestInvariantTSC(t *testing.T) {
	for _, tc := range []struct {
		info string
		want bool
	}{
		{"processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc rdtscp\n", true},
		{"flags\t\t: fpu tsc constant_tsc rdtscp\n", false},
		{"flags\t\t: fpu tsc nonstop_tsc\n", false},
		{"flags\t\t: constant_tsc_x nonstop_tsc\n", false},
		{"model name\t: x\n", false},
		{"", false},
	} {
		if got := invariantTSC([]byte(tc.info)); got != tc.want {
			t.Errorf("invariantTSC(%q) = %v, want %v", tc.info, got, tc.want)
		}
	}
}

func TestGuestClockArgs(t *testing.T) {
	if got := guestClockArgs(AccelKVM); got != nil {
		t.Errorf("guestClockArgs(kvm) = %q, want none: KVM guests have kvm-clock", got)
	}
	info, err := os.ReadFile(cpuInfoPath)
	if err != nil || !invariantTSC(info) {
		t.Skip("the host's TSC is not invariant: nothing to hand the guest")
	}
	got := guestClockArgs(AccelTCG)
	if len(got) != 2 || got[1] != "tsc=reliable" || !strings.HasPrefix(got[0], "tsc_early_khz=") {
		t.Fatalf("guestClockArgs(tcg) = %q", got)
	}
	if n := len(strings.Join(got, " ")) + 1; n > clockArgsMax {
		t.Errorf("clock arguments take %d bytes, clockArgsMax keeps %d", n, clockArgsMax)
	}
	khz, _ := strconv.ParseInt(strings.TrimPrefix(got[0], "tsc_early_khz="), 10, 64)
	// The host kernel's own figure for its clock, within 5%: a TSC read
	// wrongly (a wrong unit, a preempted sample) is off by far more.
	if mhz := cpuMHz(info); mhz > 0 && (float64(khz) < mhz*950 || float64(khz) > mhz*1050) {
		t.Errorf("measured the TSC at %d kHz; /proc/cpuinfo says %.0f MHz", khz, mhz)
	}
	if again := hostTSCkHz(); again != khz {
		t.Errorf("two measurements disagree: %d then %d kHz (a template keyed by the command line would not be found)", khz, again)
	}
}

// cpuMHz is the first "cpu MHz" of /proc/cpuinfo, 0 if none.
func cpuMHz(info []byte) float64 {
	for _, line := range bytes.Split(info, []byte("\n")) {
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && string(bytes.TrimSpace(k)) == "cpu MHz" {
			f, _ := strconv.ParseFloat(string(bytes.TrimSpace(v)), 64)
			return f
		}
	}
	return 0
}

// TestCachedTSCkHz: the first shim of a boot measures and records the
// figure; later ones read it; a record of another boot or an implausible
// figure is measured again.
func TestCachedTSCkHz(t *testing.T) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Skip("no boot id: nothing to key the cache on")
	}
	id := strings.TrimSpace(string(boot))
	path := filepath.Join(t.TempDir(), "run", "tsc-khz")
	measured := cachedTSCkHz(path)
	if rec, err := os.ReadFile(path); err != nil || string(rec) != fmt.Sprintf("%s %d\n", id, measured) {
		t.Fatalf("recorded %q (%v), want %q", rec, err, fmt.Sprintf("%s %d\n", id, measured))
	}
	const fake = 1234000 // not this host's figure, but plausible
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("%s %d\n", id, fake))
	if got := cachedTSCkHz(path); got != fake {
		t.Errorf("with this boot's record: %d kHz, want the recorded %d", got, fake)
	}
	for _, rec := range []string{
		fmt.Sprintf("another-boot %d\n", fake),
		fmt.Sprintf("%s 5\n", id),
		"garbage",
	} {
		write(rec)
		if got := cachedTSCkHz(path); got == fake || got == 5 || got < minTSCkHz {
			t.Errorf("with record %q: %d kHz, want a fresh measurement", rec, got)
		}
		if b, _ := os.ReadFile(path); !strings.HasPrefix(string(b), id+" ") {
			t.Errorf("with record %q: left %q, want this boot's", rec, b)
		}
	}
}
