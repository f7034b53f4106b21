package integration

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/boxlite/boxlite/pkg/vmm"
)

// volumeScript is the workload, run by busybox sh as
// `sh VOL/bench.sh VOL STAGE DROP` in a box (9p), in a virtio-fs guest and
// on the host. STAGE is a tmpfs directory that allows exec. Untimed, it
// copies the archive and the tscstamp helper there and starts the helper;
// then it timestamps (TSC ticks, see tscstampSource) the untar into VOL/out,
// a syncfs of the volume, a 100 MiB write with fsync, and a read of it back
// after dropping the guest's page cache when DROP is "drop" (never on the
// host: that would drop the whole machine's cache). It prints
// "BENCH t0 ... t6", t6 taken right after t5 (the cost of a timestamp).
const volumeScript = `set -e
v=$1 s=$2
cp "$v/src.tar" "$v/tscstamp" "$s/"
mkfifo "$s/req" "$s/resp"
"$s/tscstamp" "$s/req" "$s/resp" &
exec 3>"$s/req" 4<"$s/resp"
stamp() { echo >&3; read -r t <&4; }
mkdir "$v/out"
stamp; t0=$t
tar -xf "$s/src.tar" -C "$v/out"
stamp; t1=$t
sync -f "$v/out"
stamp; t2=$t
dd if=/dev/zero of="$v/big" bs=1M count=100 conv=fsync 2>/dev/null
stamp; t3=$t
if [ "$3" = drop ]; then echo 3 2>/dev/null >/proc/sys/vm/drop_caches || true; fi
stamp; t4=$t
dd if="$v/big" of=/dev/null bs=1M 2>/dev/null
stamp; t5=$t
stamp; t6=$t
exec 3>&- 4<&-
wait
rm "$s/src.tar" "$s/tscstamp" "$s/req" "$s/resp"
echo BENCH $t0 $t1 $t2 $t3 $t4 $t5 $t6
`

// bigMiB is the size of the sequential write and read.
const bigMiB = 100

// volumeTiming is one run of volumeScript.
type volumeTiming struct {
	// untar is tar -xf alone; sync the syncfs after it.
	untar, sync time.Duration
	// write is the 100 MiB dd with fsync; read the dd back.
	write, read time.Duration
	// stamp is what taking one timestamp costs (in every other number).
	stamp time.Duration
}

// untarSync is the untar workload: extraction and the sync that follows.
func (v volumeTiming) untarSync() time.Duration { return v.untar + v.sync }

// total is everything timed.
func (v volumeTiming) total() time.Duration { return v.untar + v.sync + v.write + v.read }

// parseVolumeTiming finds the BENCH line in out and converts its TSC ticks
// at hz.
func parseVolumeTiming(out string, hz float64) (volumeTiming, error) {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(strings.TrimSpace(line))
		if len(f) != 8 || f[0] != "BENCH" {
			continue
		}
		var ts [7]uint64
		for i := range ts {
			n, err := strconv.ParseUint(f[i+1], 10, 64)
			if err != nil {
				return volumeTiming{}, fmt.Errorf("BENCH line %q: %w", line, err)
			}
			if i > 0 && n < ts[i-1] {
				return volumeTiming{}, fmt.Errorf("BENCH line %q: the counter went back", line)
			}
			ts[i] = n
		}
		d := func(i int) time.Duration {
			return time.Duration(float64(ts[i+1]-ts[i]) / hz * float64(time.Second))
		}
		return volumeTiming{untar: d(0), sync: d(1), write: d(2), read: d(4), stamp: d(5)}, nil
	}
	return volumeTiming{}, fmt.Errorf("no BENCH line in %q", clipStr(out))
}

// volumeBench is the shared state of BenchmarkVolume: one host directory
// (on the host's /tmp file system) used as the volume by every transport.
type volumeBench struct {
	b *testing.B
	// vol holds bench.sh, src.tar and tscstamp, and after a run out/ and
	// big.
	vol string
	// wantFiles and wantBytes are what out/ must hold after the untar.
	wantFiles int
	wantBytes int64
}

// check verifies what a run left in the volume and clears it, then flushes
// the host file system so the next run starts with no dirty data.
func (v *volumeBench) check(name string) {
	b := v.b
	b.Helper()
	files, n, err := treeSize(filepath.Join(v.vol, "out"))
	if err != nil || files != v.wantFiles || n != v.wantBytes {
		b.Fatalf("%s: out/ holds %d files, %d bytes (%v); want %d, %d", name, files, n, err, v.wantFiles, v.wantBytes)
	}
	if st, err := os.Stat(filepath.Join(v.vol, "big")); err != nil || st.Size() != bigMiB<<20 {
		b.Fatalf("%s: big: %v %v, want %d bytes", name, st, err, bigMiB<<20)
	}
	v.reset()
}

// reset removes a run's output and flushes the host file system.
func (v *volumeBench) reset() {
	v.b.Helper()
	if err := os.RemoveAll(filepath.Join(v.vol, "out")); err != nil {
		v.b.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(v.vol, "big")); err != nil {
		v.b.Fatal(err)
	}
	syncfsDir(v.b, v.vol)
}

// timed parses a run's output, converting TSC ticks at hz, and checks that
// the time measured fits in the run's host wall time.
func timed(b *testing.B, name, out string, hz float64, wall time.Duration) volumeTiming {
	b.Helper()
	tm, err := parseVolumeTiming(out, hz)
	if err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	if tm.total() > wall {
		b.Fatalf("%s: measured %v, longer than the run's wall time %v", name, tm.total(), wall)
	}
	return tm
}

// probeRun reports whether this call is go test's first one (b.N = 1),
// made before the call with -benchtime's count when that is Nx with N > 1:
// its result is replaced, so a benchmark that takes minutes can skip it.
func probeRun(b *testing.B) bool {
	f := flag.Lookup("test.benchtime")
	if f == nil || b.N != 1 {
		return false
	}
	n, err := strconv.Atoi(strings.TrimSuffix(f.Value.String(), "x"))
	return err == nil && strings.HasSuffix(f.Value.String(), "x") && n > 1
}

// Transports of BenchmarkVolume, the table's columns.
const (
	onHost       = "host"
	on9p         = "9p (boxlite)"
	onVirtiofs   = "virtio-fs"
	onVirtiofsNC = "virtio-fs cache=none"
)

// volumeTransport is one way of reaching the volume: a column of the table.
type volumeTransport struct {
	// name heads the column; metric prefixes its metrics.
	name, metric string
	// run runs the workload once and returns its timing.
	run func() volumeTiming
}

// BenchmarkVolume compares a volume workload (untar of 1000 small files,
// 100 MiB write with fsync, read back) on one host directory reached four
// ways: through boxlite's product path (a box with -v, the share over 9p with
// cache=none), through virtio-fs (virtiofsd with its default cache=auto, and
// with cache=none; the same kernel, VM size and script; boxlite does not
// ship it), and from the host itself (the floor). Each iteration runs every
// transport, in rotating order; the table shows medians. Times are taken
// inside the guest, so VM boot is not counted.
func BenchmarkVolume(b *testing.B) {
	if probeRun(b) {
		return
	}
	m := newMgr(b)
	dir := shortTempDir(b)
	stage, err := os.MkdirTemp("/dev/shm", "bx")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(stage) })
	// Runs before newMgr's check (cleanups run last first).
	b.Cleanup(func() { assertNoLeaks(b, 0, dir, stage) })
	tscstamp := buildTSCStamp(b)
	hz := tscHz(b, tscstamp)
	archive, archiveBytes := smallFilesTar(b)
	v := &volumeBench{b: b, vol: filepath.Join(dir, "vol"), wantFiles: archiveFiles, wantBytes: archiveBytes}
	if err := os.Mkdir(v.vol, 0o755); err != nil {
		b.Fatal(err)
	}
	helper, err := os.ReadFile(tscstamp)
	if err != nil {
		b.Fatal(err)
	}
	for name, data := range map[string][]byte{"src.tar": archive, "bench.sh": []byte(volumeScript), "tscstamp": helper} {
		if err := os.WriteFile(filepath.Join(v.vol, name), data, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	// A box's /run is a tmpfs that allows exec (its /dev/shm does not);
	// the virtio-fs guest mounts one there too.
	const guestCmd = "sh /vol/bench.sh /vol /run drop"

	transports := []volumeTransport{
		{onHost, "host", func() volumeTiming {
			began := time.Now()
			out, err := runHost("/bin/busybox", "sh", filepath.Join(v.vol, "bench.sh"), v.vol, stage, "keep")
			if err != nil {
				b.Fatalf("host: %v", err)
			}
			return timed(b, onHost, out, hz, time.Since(began))
		}},
		{on9p, "9p", func() volumeTiming {
			began := time.Now()
			r := m.run(nil, "run", "--rm", "--network", "none", "-v", v.vol+":/vol", "--rootfs", m.rootfs, "--", "sh", "-c", guestCmd)
			if r.code != 0 {
				b.Fatalf("9p box: %v", r)
			}
			return timed(b, on9p, r.stdout, hz, time.Since(began))
		}},
	}
	if _, err := os.Stat(virtiofsdPath); err != nil {
		b.Logf("virtio-fs columns skipped: %v (Debian's qemu-system-common ships it: run make setup)", err)
	} else {
		accel, _, err := vmm.DetectAccel(vmm.AccelAuto, vmm.ProbeHost())
		if err != nil {
			b.Fatal(err)
		}
		g := virtiofsGuest{dir: v.vol, initrd: virtiofsInitrd(b, guestCmd), memoryMiB: vmm.DefaultMemoryMiB, vcpus: vmm.DefaultVCPUs, accel: accel}
		for _, c := range []struct{ name, metric, cache string }{{onVirtiofs, "vfs", ""}, {onVirtiofsNC, "vfsnc", "none"}} {
			g := g
			g.cache = c.cache
			transports = append(transports, volumeTransport{c.name, c.metric, func() volumeTiming {
				r := g.run(b)
				if !strings.Contains(r.console, "BENCH-EXIT 0") {
					b.Fatalf("%s guest: %s", c.name, clipStr(r.console))
				}
				return timed(b, c.name, r.console, hz, r.wall)
			}})
		}
	}

	got := make(map[string][]volumeTiming)
	v.reset()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := range transports {
			tr := transports[(i+j)%len(transports)]
			got[tr.name] = append(got[tr.name], tr.run())
			v.check(tr.name)
		}
	}
	b.StopTimer()
	reportVolume(b, transports, got)
}

// volumeRow is one line of the table: a name and how to get it from a run.
type volumeRow struct {
	name   string
	metric string
	get    func(volumeTiming) time.Duration
	// mib, when set, makes the row a throughput: MiB/s for that many MiB
	// (no ratios: they would be the inverse of the time row's).
	mib float64
	// headline rows also report their ratios as metrics.
	headline bool
}

// volumeRatios are the ratio columns: numerator and denominator transports
// and the metric name.
var volumeRatios = []struct{ num, den, metric string }{
	{on9p, onVirtiofs, "9p/vfs"},
	{on9p, onHost, "9p/host"},
	{onVirtiofs, onHost, "vfs/host"},
	{on9p, onVirtiofsNC, "9p/vfsnc"},
}

// volumeCell is a median of one transport, if it ran.
type volumeCell struct {
	x  float64
	ok bool
}

// reportVolume prints the medians as a table (ms, MiB/s, ratios of times:
// above 1 is slower) and reports them as metrics.
func reportVolume(b *testing.B, transports []volumeTransport, got map[string][]volumeTiming) {
	rows := []volumeRow{
		{name: "untar 1000 files + sync (ms)", metric: "untar-sync-ms", get: volumeTiming.untarSync, headline: true},
		{name: "  of which tar -xf (ms)", metric: "untar-ms", get: func(v volumeTiming) time.Duration { return v.untar }},
		{name: "  of which sync -f (ms)", metric: "sync-ms", get: func(v volumeTiming) time.Duration { return v.sync }},
		{name: "write 100 MiB + fsync (ms)", metric: "write-ms", get: func(v volumeTiming) time.Duration { return v.write }, headline: true},
		{name: "write (MiB/s)", metric: "write-MiB/s", get: func(v volumeTiming) time.Duration { return v.write }, mib: bigMiB},
		{name: "read 100 MiB back (ms)", metric: "read-ms", get: func(v volumeTiming) time.Duration { return v.read }, headline: true},
		{name: "read (MiB/s)", metric: "read-MiB/s", get: func(v volumeTiming) time.Duration { return v.read }, mib: bigMiB},
	}
	med := func(name string, r volumeRow) volumeCell {
		runs := got[name]
		if len(runs) == 0 {
			return volumeCell{}
		}
		var d []time.Duration
		for _, v := range runs {
			d = append(d, r.get(v))
		}
		m := median(d)
		if r.mib > 0 {
			return volumeCell{x: r.mib / m.Seconds(), ok: true}
		}
		return volumeCell{x: ms(m), ok: true}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nvolume workload, medians of %d runs (guests: 1 vCPU, %d MiB; volume: a directory under %s; ratios of times, >1 = slower)\n",
		b.N, vmm.DefaultMemoryMiB, os.TempDir())
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(w, "workload\t")
	for _, tr := range transports {
		fmt.Fprintf(w, "%s\t", tr.name)
	}
	for _, q := range volumeRatios {
		fmt.Fprintf(w, "%s\t", q.metric)
	}
	fmt.Fprintln(w)
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t", r.name)
		cells := make(map[string]volumeCell)
		for _, tr := range transports {
			c := med(tr.name, r)
			cells[tr.name] = c
			fmt.Fprintf(w, "%.1f\t", c.x)
			b.ReportMetric(c.x, tr.metric+"-"+r.metric)
		}
		for _, q := range volumeRatios {
			num, den := cells[q.num], cells[q.den]
			switch {
			case r.mib > 0:
				fmt.Fprint(w, "\t")
			case !num.ok || !den.ok || den.x == 0:
				fmt.Fprint(w, "n/a\t")
			default:
				fmt.Fprintf(w, "%.2f\t", num.x/den.x)
				if r.headline {
					b.ReportMetric(num.x/den.x, q.metric+"-"+strings.TrimSuffix(r.metric, "-ms"))
				}
			}
		}
		fmt.Fprintln(w)
	}
	w.Flush()
	fmt.Fprint(&sb, "cost of one timestamp (median, in every number above):")
	for _, tr := range transports {
		var d []time.Duration
		for _, v := range got[tr.name] {
			d = append(d, v.stamp)
		}
		if len(d) > 0 {
			fmt.Fprintf(&sb, " %s %.3f ms;", tr.name, ms(median(d)))
		}
	}
	fmt.Fprintln(&sb)
	fmt.Print(sb.String())
}
