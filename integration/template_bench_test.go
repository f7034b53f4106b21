package integration

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/shim"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// templateRuns is how many samples each figure of BenchmarkTemplates takes.
const templateRuns = 7

// The template benchmark is measured once per process, as the idle one.
var (
	templateOnce   sync.Once
	templateResult map[string]float64
)

// BenchmarkTemplates prints issue 10's table of VM templates against cold
// boots, each figure the median of templateRuns samples taken alternating
// in the same run: launch → agent ready (with the bare boot of the same
// kernel to /init and out as the floor), `ctr run --rm true` (runc the
// baseline), `boxlite run --rm true`, and the PSS of idle VMs with five
// alive; then the template's build time and size.
func BenchmarkTemplates(b *testing.B) {
	templateOnce.Do(func() { templateResult = measureTemplates(b) })
	for k, v := range templateResult {
		b.ReportMetric(v, k)
	}
}

func measureTemplates(b *testing.B) map[string]float64 {
	out := map[string]float64{}
	rootfs := busyboxRootfs(b)
	dir := templateDir(b)
	tcfg := func() sandbox.Config {
		cfg := sandboxConfig(b, rootfs, vmOpts{})
		cfg.VM.Templates = &vmm.Templates{Dir: dir}
		return cfg
	}
	// The first start builds the template.
	began := time.Now()
	stopNow(b, startOrFail(b, tcfg()))
	firstUse := time.Since(began)
	meta := onlyTemplate(b, dir)
	_, sizes, _ := vmm.ListTemplates(dir)

	floorInitrd := rawInitrd(b, "#!/bin/busybox sh\n/bin/busybox reboot -f\n")
	var floor, cold, tmpl, coldFirst, tmplFirst []time.Duration
	// coldSplit and tmplSplit split the first process into its calls.
	var coldSplit, tmplSplit [3][]time.Duration
	// firstProcess runs `true` as the VM's first container (under TCG a
	// clone translates the guest's code afresh: QEMU's translation cache
	// is not part of a migration).
	firstProcess := func(sb *sandbox.Sandbox, split *[3][]time.Duration) time.Duration {
		t0 := time.Now()
		res := runBox(b, sb, "first", newSpec(b, "first", []string{"true"}), nil)
		if res.exit.ExitStatus != 0 {
			b.Fatalf("first process: exit %d", res.exit.ExitStatus)
		}
		for i, d := range []time.Duration{res.took.start, res.took.exit, res.took.delete} {
			split[i] = append(split[i], d)
		}
		return time.Since(t0)
	}
	for i := 0; i < templateRuns; i++ {
		floor = append(floor, bareBoot(b, rootfs, floorInitrd))
		sb := startOrFail(b, sandboxConfig(b, rootfs, vmOpts{}))
		cold = append(cold, sb.BootTime)
		coldFirst = append(coldFirst, firstProcess(sb, &coldSplit))
		stopNow(b, sb)
		sb = startOrFail(b, tcfg())
		if sb.Template() != meta.Key {
			b.Fatalf("box restored from %q, want %s", sb.Template(), meta.Key)
		}
		tmpl = append(tmpl, sb.BootTime)
		tmplFirst = append(tmplFirst, firstProcess(sb, &tmplSplit))
		stopNow(b, sb)
	}
	assertNoLeaks(b, 0, rootfs)
	coldPSS := idlePSS(b, func() sandbox.Config { return sandboxConfig(b, rootfs, vmOpts{}) })
	tmplPSS := idlePSS(b, tcfg)
	coldBase, coldPeak, coldAfter := memoryReturn(b, sandboxConfig(b, rootfs, vmOpts{}))
	tmplBase, tmplPeak, tmplAfter := memoryReturn(b, tcfg())

	// Each front door in a sub-benchmark of its own, so that its daemon
	// and its leak check end with it.
	var ctrCold, ctrTmpl, ctrRunc []time.Duration
	runOnce(b, "ctr", func(b *testing.B) {
		c := startContainerd(b)
		ctrRun := func(rt string, flags ...string) time.Duration {
			r := c.runRm(b, rt, flags, "true")
			if r.code != 0 {
				b.Fatalf("%s: exit %d stderr %q", rt, r.code, r.stderr)
			}
			return r.elapsed
		}
		off := []string{"--annotation", shim.AnnotationTemplates + "=false"}
		ctrRun(boxliteRuntime) // builds the shim's template of this shape
		for i := 0; i < templateRuns; i++ {
			ctrRunc = append(ctrRunc, ctrRun(runcRuntime))
			ctrCold = append(ctrCold, ctrRun(boxliteRuntime, off...))
			ctrTmpl = append(ctrTmpl, ctrRun(boxliteRuntime))
		}
	})
	var mgrCold, mgrTmpl []time.Duration
	runOnce(b, "manager", func(b *testing.B) {
		m := newMgr(b)
		mgrRun := func(env ...string) time.Duration {
			m.env = env
			start := time.Now()
			if r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "true"); r.code != 0 {
				b.Fatalf("run --rm true: %v", r)
			}
			return time.Since(start)
		}
		mgrRun()
		for i := 0; i < templateRuns; i++ {
			mgrCold = append(mgrCold, mgrRun(shim.TemplatesEnv+"=off"))
			mgrTmpl = append(mgrTmpl, mgrRun())
		}
	})
	// CRI: one containerd at a time (its harness owns the test's child
	// processes), the cold one's shims told so by their environment; so
	// these two rows are not alternated.
	criRuns := func(name string, env string) (d []time.Duration) {
		runOnce(b, name, func(b *testing.B) {
			if env != "" {
				os.Setenv(shim.TemplatesEnv, env)
			}
			e := startCRI(b)
			os.Unsetenv(shim.TemplatesEnv)
			e.pullCRITestImage(b)
			for i := -1; i < templateRuns; i++ {
				t0 := time.Now()
				pod := e.runPod(b, fmt.Sprintf("tmpl-bench-%d", i+1), "boxlite", false)
				pod.start(b, "c0", "sleep", "100000")
				if i >= 0 { // the first builds the pod shape's template
					d = append(d, time.Since(t0))
				}
				pod.remove(b)
			}
		})
		return d
	}
	criCold := criRuns("cri-cold", "off")
	criTmpl := criRuns("cri-template", "")

	f := median(floor)
	fmt.Printf("\nVM templates: medians of %d, alternating, in one run (TCG)\n", templateRuns)
	fmt.Printf("%-44s %10s %10s %8s\n", "figure", "cold", "template", "ratio")
	row := func(name string, c, t float64, unit string) {
		fmt.Printf("%-44s %8.0f%-2s %8.0f%-2s %7.2fx\n", name, c, unit, t, unit, t/c)
	}
	row("launch -> agent ready", ms(median(cold)), ms(median(tmpl)), "ms")
	row("the VM's first process (true), start to exit", ms(median(coldFirst)), ms(median(tmplFirst)), "ms")
	for i, step := range []string{"create + start", "to the exit", "delete"} {
		row("  of which "+step, ms(median(coldSplit[i])), ms(median(tmplSplit[i])), "ms")
	}
	fmt.Printf("%-44s %8.0fms\n", "bare QEMU boot to /init and out (floor)", ms(f))
	row("ctr run --rm true", ms(median(ctrCold)), ms(median(ctrTmpl)), "ms")
	fmt.Printf("%-44s %8.0fms   -> boxlite/runc: cold %.1fx, template %.1fx\n", "ctr run --rm true under runc (baseline)",
		ms(median(ctrRunc)), float64(median(ctrCold))/float64(median(ctrRunc)), float64(median(ctrTmpl))/float64(median(ctrRunc)))
	row("boxlite run --rm true", ms(median(mgrCold)), ms(median(mgrTmpl)), "ms")
	fmt.Printf("%-44s %9.2f  %9.2f\n", "boxlite run --rm true / floor", float64(median(mgrCold))/float64(f), float64(median(mgrTmpl))/float64(f))
	row("CRI: crictl runp + create + start (not alt.)", ms(median(criCold)), ms(median(criTmpl)), "ms")
	row("PSS per idle VM, 5 alive", coldPSS, tmplPSS, "Mi")
	fmt.Printf("%-44s %5.0f/%.0f/%.0f %5.0f/%.0f/%.0f MiB\n", "VMM RSS: idle / 60 MiB written / freed", coldBase, coldPeak, coldAfter, tmplBase, tmplPeak, tmplAfter)
	fmt.Printf("template: first use (build + restore) %v, build %v, %.0f MiB on disk, device state %d KB\n",
		firstUse.Round(time.Millisecond), meta.BuildTime.Round(time.Millisecond), float64(sizes[0])/(1<<20), meta.StateSize/1000)

	out["ready-cold-ms"], out["ready-template-ms"] = ms(median(cold)), ms(median(tmpl))
	out["first-process-cold-ms"], out["first-process-template-ms"] = ms(median(coldFirst)), ms(median(tmplFirst))
	out["floor-ms"] = ms(f)
	out["ctr-cold-ms"], out["ctr-template-ms"], out["ctr-runc-ms"] = ms(median(ctrCold)), ms(median(ctrTmpl)), ms(median(ctrRunc))
	out["ctr-template/runc"] = float64(median(ctrTmpl)) / float64(median(ctrRunc))
	out["run-cold-ms"], out["run-template-ms"] = ms(median(mgrCold)), ms(median(mgrTmpl))
	out["run-template/floor"] = float64(median(mgrTmpl)) / float64(f)
	out["pss-cold-MiB"], out["pss-template-MiB"] = coldPSS, tmplPSS
	out["cri-cold-ms"], out["cri-template-ms"] = ms(median(criCold)), ms(median(criTmpl))
	out["rss-freed-cold-MiB"], out["rss-freed-template-MiB"] = coldAfter, tmplAfter
	out["template-build-ms"] = ms(meta.BuildTime)
	out["template-disk-MiB"] = float64(sizes[0]) / (1 << 20)
	return out
}

func startOrFail(b *testing.B, cfg sandbox.Config) *sandbox.Sandbox {
	b.Helper()
	sb, err := sandbox.Start(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	return sb
}

func stopNow(b *testing.B, sb *sandbox.Sandbox) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := sb.Stop(ctx); err != nil {
		b.Fatal(err)
	}
}

// idlePSS starts five VMs, lets them settle, and returns their median PSS
// in MiB.
func idlePSS(b *testing.B, cfg func() sandbox.Config) float64 {
	var sbs []*sandbox.Sandbox
	for i := 0; i < 5; i++ {
		sbs = append(sbs, startOrFail(b, cfg()))
	}
	// Settle: let the guests finish what booting left (a few seconds of
	// kernel work after agent-ready), measured by nothing but time.
	time.Sleep(3 * time.Second)
	var pss []time.Duration
	for _, sb := range sbs {
		pss = append(pss, time.Duration(pssKiB(sb.Identity().Pid)))
	}
	for _, sb := range sbs {
		stopNow(b, sb)
	}
	return float64(median(pss)) / 1024
}

// memoryReturn boots a VM, writes 60 MiB into a tmpfs in a container and
// removes it, and returns the VMM's RSS (MiB) before, at the peak, and once
// it has settled after the free (free-page reporting batches its reports:
// up to 20 s, ending early once RSS is back near the idle figure).
func memoryReturn(b *testing.B, cfg sandbox.Config) (base, peak, after float64) {
	sb := startOrFail(b, cfg)
	defer stopNow(b, sb)
	pid := sb.Identity().Pid
	rss := func() float64 { return float64(rssKiB(pid)) / 1024 }
	runBox(b, sb, "warm", newSpec(b, "warm", []string{"true"}), nil)
	base = rss()
	res := runBox(b, sb, "fill", newSpec(b, "fill", []string{"sh", "-c",
		"dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 2>/dev/null && cat /proc/meminfo | grep Shmem: && rm /dev/shm/fill"}), nil)
	if res.exit.ExitStatus != 0 {
		b.Fatalf("fill: exit %d stderr %q", res.exit.ExitStatus, res.stderr)
	}
	peak = rss()
	after = peak
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		time.Sleep(500 * time.Millisecond)
		after = rss()
		if after < base+10 {
			break
		}
	}
	return base, peak, after
}

// runOnce runs fn as the sub-benchmark name, once: a benchmark function is
// called again with a larger b.N, and these take their samples themselves.
func runOnce(b *testing.B, name string, fn func(b *testing.B)) {
	ran := false
	b.Run(name, func(b *testing.B) {
		if ran {
			return
		}
		ran = true
		fn(b)
	})
}
