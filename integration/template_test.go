package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// These tests restore VMs from templates kept in a directory of their own
// (the shim's default, /var/lib/boxlite/templates, is left alone) and run a
// container in each clone, so a clone that came up broken fails them.

// templateSandbox starts a sandbox of rootfs with templates in dir and
// registers its teardown; kernel "" is the built one.
func templateSandbox(t testing.TB, rootfs, dir, kernel string) *sandbox.Sandbox {
	t.Helper()
	cfg := sandboxConfig(t, rootfs, vmOpts{})
	cfg.VM.Templates = &vmm.Templates{Dir: dir}
	if kernel != "" {
		cfg.VM.Kernel = kernel
	}
	sb, err := sandbox.Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := sb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		// Other boxes of the test may still run: the test's own cleanup
		// checks for children once they are all stopped.
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", sb.Identity().Pid)); err == nil {
			t.Errorf("leak: VMM pid %d still present after stop", sb.Identity().Pid)
		}
	})
	return sb
}

// templateDir is an empty template directory removed with the test.
func templateDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(shortTempDir(t), "templates")
	t.Cleanup(func() {
		// Published templates are read-only directories.
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() {
				os.Chmod(p, 0o700)
			}
			return nil
		})
	})
	return dir
}

// cloneSays runs a container printing the guest's boot id, 16 random bytes
// and its clocksource in sb, and returns the output.
func cloneSays(t testing.TB, sb *sandbox.Sandbox, id string) string {
	t.Helper()
	res := runBox(t, sb, id, newSpec(t, id, []string{"sh", "-c",
		"cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1; cat /sys/devices/system/clocksource/clocksource0/current_clocksource"}), nil)
	if res.exit.ExitStatus != 0 {
		t.Fatalf("%s: exit %d, stderr %q", id, res.exit.ExitStatus, res.stderr)
	}
	return string(res.stdout)
}

// onlyTemplate returns the one template in dir.
func onlyTemplate(t testing.TB, dir string) vmm.TemplateMeta {
	t.Helper()
	metas, _, err := vmm.ListTemplates(dir)
	if err != nil || len(metas) != 1 {
		t.Fatalf("templates in %s: %d (%v), want 1", dir, len(metas), err)
	}
	return metas[0]
}

// TestTemplateBuiltOnceUnderConcurrencyAndClonesDiffer starts four boxes
// at once with no template yet: one builds it, all four are its clones, and
// each clone's random number generator was reseeded (different boot ids and
// /dev/urandom), with its clock on the TSC.
//
// Two-sided, for the reseed gate: with the host's Dial sending no entropy,
// the first CreateContainer fails "was not reseeded by the host". With the
// gate off too, the clones still differ here: in its first two minutes the
// guest kernel reseeds its CRNG on first use once a second has passed since
// the last seed, from interrupt timings and RDSEED (under TCG, the host's
// randomness). The host's reseed makes it so whatever the timing and CPU.
func TestTemplateBuiltOnceUnderConcurrencyAndClonesDiffer(t *testing.T) {
	rootfs := busyboxRootfs(t)
	// Runs after every box's teardown (cleanups run last-in first-out).
	t.Cleanup(func() { assertNoLeaks(t, 0, rootfs) })
	dir := templateDir(t)
	before := vmm.TemplateBuilds()
	const n = 4
	sbs := make([]*sandbox.Sandbox, n)
	var wg sync.WaitGroup
	for i := range sbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sbs[i] = templateSandbox(t, rootfs, dir, "")
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if built := vmm.TemplateBuilds() - before; built != 1 {
		t.Errorf("%d templates built for %d concurrent first uses, want 1", built, n)
	}
	meta := onlyTemplate(t, dir)
	seen := map[string]int{}
	for i, sb := range sbs {
		if sb.Template() != meta.Key {
			t.Errorf("box %d restored from %q, want template %s", i, sb.Template(), meta.Key)
		}
		out := strings.Fields(cloneSays(t, sb, "c"+string(rune('0'+i))))
		if len(out) != 18 || out[17] != "tsc" {
			t.Errorf("box %d said %q: want a boot id, 16 bytes and the tsc clocksource", i, out)
			continue
		}
		for _, v := range []string{out[0], strings.Join(out[1:17], "")} {
			if j, dup := seen[v]; dup {
				t.Errorf("boxes %d and %d share %s: the clone was not reseeded", j, i, v)
			}
			seen[v] = i
		}
	}
}

// TestTemplateStaleIsRebuilt changes the kernel a template was built from:
// the next box gets a new template, and the stale one is removed.
func TestTemplateStaleIsRebuilt(t *testing.T) {
	rootfs := busyboxRootfs(t)
	// Runs after every box's teardown (cleanups run last-in first-out).
	t.Cleanup(func() { assertNoLeaks(t, 0, rootfs) })
	dir := templateDir(t)
	kernel := filepath.Join(shortTempDir(t), "vmlinux")
	data, err := os.ReadFile(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kernel, data, 0o644); err != nil {
		t.Fatal(err)
	}
	first := templateSandbox(t, rootfs, dir, kernel)
	old := onlyTemplate(t, dir)
	if first.Template() != old.Key || old.Stale() {
		t.Fatalf("first box from %q, template %s stale %v", first.Template(), old.Key, old.Stale())
	}
	// The same kernel, rewritten: a new file as far as the key goes.
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(kernel, later, later); err != nil {
		t.Fatal(err)
	}
	if !old.Stale() {
		t.Fatal("template not stale after its kernel changed")
	}
	second := templateSandbox(t, rootfs, dir, kernel)
	cur := onlyTemplate(t, dir)
	if cur.Key == old.Key || second.Template() != cur.Key {
		t.Errorf("after the kernel changed: template %s (was %s), box restored from %q", cur.Key, old.Key, second.Template())
	}
	cloneSays(t, second, "s")
}

// TestTemplateDamagedOrWritableIsBuiltAgain damages a published template
// three ways; each time the next box gets a freshly built template and runs.
func TestTemplateDamagedOrWritableIsBuiltAgain(t *testing.T) {
	rootfs := busyboxRootfs(t)
	// Runs after every box's teardown (cleanups run last-in first-out).
	t.Cleanup(func() { assertNoLeaks(t, 0, rootfs) })
	dir := templateDir(t)
	templateSandbox(t, rootfs, dir, "")
	for _, tc := range []struct {
		name   string
		damage func(tdir string) error
	}{
		{"state truncated", func(tdir string) error { return os.Truncate(filepath.Join(tdir, "state"), 1000) }},
		{"state byte flipped", func(tdir string) error {
			p := filepath.Join(tdir, "state")
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 0xff
			return os.WriteFile(p, b, 0)
		}},
		{"memory writable by others", func(tdir string) error { return os.Chmod(filepath.Join(tdir, "memory"), 0o666) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := onlyTemplate(t, dir)
			if err := tc.damage(filepath.Join(dir, old.Key)); err != nil {
				t.Fatal(err)
			}
			before := vmm.TemplateBuilds()
			sb := templateSandbox(t, rootfs, dir, "")
			cur := onlyTemplate(t, dir)
			if vmm.TemplateBuilds()-before != 1 || !cur.Built.After(old.Built) || sb.Template() != cur.Key {
				t.Errorf("damaged template not built again: builds %d, built %v then %v, box from %q",
					vmm.TemplateBuilds()-before, old.Built, cur.Built, sb.Template())
			}
			fi, err := os.Stat(filepath.Join(dir, cur.Key, "memory"))
			if err != nil || fi.Mode().Perm() != 0o444 {
				t.Errorf("rebuilt memory file: %v %v, want mode 0444", fi.Mode(), err)
			}
			cloneSays(t, sb, "d")
		})
	}
}

// TestTemplateThatCannotBeRestoredFallsBackToColdBoot gives a template a
// device state QEMU cannot load but whose checksum matches: the clone dies,
// the box boots cold and runs, and the template is discarded.
func TestTemplateThatCannotBeRestoredFallsBackToColdBoot(t *testing.T) {
	rootfs := busyboxRootfs(t)
	// Runs after every box's teardown (cleanups run last-in first-out).
	t.Cleanup(func() { assertNoLeaks(t, 0, rootfs) })
	dir := templateDir(t)
	templateSandbox(t, rootfs, dir, "")
	meta := onlyTemplate(t, dir)
	tdir := filepath.Join(dir, meta.Key)
	state := filepath.Join(tdir, "state")
	b, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	// QEMU's stream magic, then garbage.
	bad := append(b[:8:8], make([]byte, 4096)...)
	if err := os.WriteFile(state, bad, 0); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(tdir, "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	fixed := strings.Replace(string(raw), meta.StateSHA256, sha256Hex(bad), 1)
	fixed = strings.Replace(fixed, `"state_size": `+itoa(int(meta.StateSize)), `"state_size": `+itoa(len(bad)), 1)
	if err := os.WriteFile(filepath.Join(tdir, "meta.json"), []byte(fixed), 0); err != nil {
		t.Fatal(err)
	}
	sb := templateSandbox(t, rootfs, dir, "")
	if sb.Template() != "" {
		t.Errorf("box restored from %q: want a cold boot after the clone failed", sb.Template())
	}
	if _, err := os.Stat(tdir); !os.IsNotExist(err) {
		t.Errorf("template that could not be restored is still there: %v", err)
	}
	cloneSays(t, sb, "f")
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestTemplateBuildMakesTheManagersTemplate builds a template with `boxlite
// template build` before any box ran: the default box of `boxlite run` is
// then restored from it, and builds no other (the shim and the CLI compute
// the same key, or the directory would hold two).
func TestTemplateBuildMakesTheManagersTemplate(t *testing.T) {
	m := newMgr(t)
	dir := templateDir(t)
	m.env = []string{vmm.TemplateDirEnv + "=" + dir}
	key := strings.TrimSpace(m.ok("template", "build"))
	built := onlyTemplate(t, dir)
	if built.Key != key {
		t.Fatalf("template build printed %q; the directory holds %s", key, built.Key)
	}
	if r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "true"); r.code != 0 {
		t.Fatalf("run --rm true: %v", r)
	}
	if after := onlyTemplate(t, dir); after.Key != key || !after.Built.Equal(built.Built) {
		t.Errorf("after a box ran: template %s built %v, want %s built %v (the box did not use it)", after.Key, after.Built, key, built.Built)
	}
	if ls := m.ok("template", "ls"); !strings.Contains(ls, key) {
		t.Errorf("template ls:\n%s\nwant %s", ls, key)
	}
}
