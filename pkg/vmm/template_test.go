package vmm

import (
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// shapeConfig writes a kernel, an initrd and a QEMU binary into a fresh
// directory and returns a config naming them: two NICs, a tap and user
// networking with a published port, and per-box values a template leaves
// out.
func shapeConfig(t *testing.T) *Config {
	t.Helper()
	dir := t.TempDir()
	c := &Config{
		Kernel:     filepath.Join(dir, "vmlinux"),
		Initrd:     filepath.Join(dir, "initramfs.cpio"),
		QEMUBinary: filepath.Join(dir, "qemu-system-x86_64"),
		Share:      "/boxes/1/share",
		StateDir:   "/run/boxes/1",
		VCPUs:      1,
		MemoryMiB:  256,
		KernelArgs: []string{"boxlite.debug=1"},
		NICs: []NIC{
			{MAC: testMAC(1), Tap: testTap(t)},
			{MAC: testMAC(2), User: &UserNet{Forwards: []Forward{{Proto: "tcp", HostPort: 8080, GuestPort: 80}}}},
		},
	}
	for _, f := range []string{c.Kernel, c.Initrd, c.QEMUBinary} {
		if err := os.WriteFile(f, []byte("contents of "+filepath.Base(f)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func shapeKey(t *testing.T, c *Config, accel Accel) string {
	t.Helper()
	m, err := templateShape(c, accel)
	if err != nil {
		t.Fatalf("templateShape: %v", err)
	}
	if len(m.Key) != 16 {
		t.Fatalf("key %q is not 16 hex digits", m.Key)
	}
	if _, err := hex.DecodeString(m.Key); err != nil {
		t.Fatalf("key %q is not hex: %v", m.Key, err)
	}
	return m.Key
}

func TestTemplateShapeIsStableAndLeavesPerBoxValuesOut(t *testing.T) {
	c := shapeConfig(t)
	m, err := templateShape(c, AccelTCG)
	if err != nil {
		t.Fatal(err)
	}
	if again := shapeKey(t, c, AccelTCG); again != m.Key {
		t.Fatalf("key changed between two calls on the same config: %s then %s", m.Key, again)
	}
	if !slices.Equal(m.NICs, []string{"tap", "user"}) {
		t.Errorf("meta NICs = %q, want [tap user]", m.NICs)
	}
	if m.MemoryMiB != 256 || m.VCPUs != 1 || m.Accel != AccelTCG || m.Format != templateFormat {
		t.Errorf("meta = %+v, want 256 MiB, 1 vCPU, tcg, format %d", m, templateFormat)
	}
	for _, p := range []string{c.Kernel, c.Initrd, c.QEMUBinary} {
		id, err := fileIdentity(p)
		if err != nil {
			t.Fatal(err)
		}
		if m.Files[p] != id {
			t.Errorf("meta Files[%s] = %q, want %q", p, m.Files[p], id)
		}
	}
	args := strings.Join(m.Args, " ")
	for _, per := range []string{c.Share, c.StateDir, testMAC(1).String(), testMAC(2).String(), "hostfwd", "8080"} {
		if strings.Contains(args, per) {
			t.Errorf("template args hold the per-box value %q: %s", per, args)
		}
	}
	for _, want := range []string{"mem-path=/template/memory", "-incoming defer", templateMAC(0).String(), templateMAC(1).String()} {
		if !strings.Contains(args, want) {
			t.Errorf("template args lack %q: %s", want, args)
		}
	}
	// The caller's config is left as it was.
	if c.NICs[0].MAC.String() != testMAC(1).String() || len(c.NICs[1].User.Forwards) != 1 ||
		c.Share != "/boxes/1/share" || c.template != nil {
		t.Errorf("templateShape changed its config: %+v", c)
	}

	same := []struct {
		name string
		edit func(*Config)
	}{
		{"share", func(c *Config) { c.Share = "/boxes/2/share" }},
		{"state dir", func(c *Config) { c.StateDir = "/run/boxes/2" }},
		{"MACs", func(c *Config) { c.NICs[0].MAC, c.NICs[1].MAC = testMAC(0x11), testMAC(0x12) }},
		{"published ports", func(c *Config) {
			c.NICs[1].User = &UserNet{Forwards: []Forward{{Proto: "udp", HostPort: 53, GuestPort: 5353}, {Proto: "tcp", HostPort: 2222, GuestPort: 22}}}
		}},
		{"no published ports", func(c *Config) { c.NICs[1].User = &UserNet{} }},
		{"tap file", func(c *Config) { c.NICs[0].Tap = testTap(t) }},
		{"network namespace", func(c *Config) { c.NetNS = testTap(t) }},
		{"console log size", func(c *Config) { c.ConsoleLogMax = 1 << 30 }},
	}
	for _, tt := range same {
		t.Run("same key/"+tt.name, func(t *testing.T) {
			e := *c
			e.NICs = slices.Clone(c.NICs)
			tt.edit(&e)
			if got := shapeKey(t, &e, AccelTCG); got != m.Key {
				t.Errorf("key changed from %s to %s", m.Key, got)
			}
		})
	}
}

func TestTemplateShapeChangesWithWhatTheRestoreDependsOn(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(t *testing.T, c *Config)
		accel Accel
	}{
		{name: "memory", edit: func(_ *testing.T, c *Config) { c.MemoryMiB = 512 }},
		{name: "vcpus", edit: func(_ *testing.T, c *Config) { c.VCPUs = 2 }},
		{name: "kernel args", edit: func(_ *testing.T, c *Config) { c.KernelArgs = append(c.KernelArgs, "init=/sbin/other") }},
		{name: "no kernel args", edit: func(_ *testing.T, c *Config) { c.KernelArgs = nil }},
		{name: "accelerator", accel: AccelKVM},
		{name: "one NIC fewer", edit: func(_ *testing.T, c *Config) { c.NICs = c.NICs[:1] }},
		{name: "no NICs", edit: func(_ *testing.T, c *Config) { c.NICs = nil }},
		{name: "one NIC more", edit: func(t *testing.T, c *Config) {
			c.NICs = append(c.NICs, NIC{MAC: testMAC(3), Tap: testTap(t)})
		}},
		{name: "tap becomes user networking", edit: func(_ *testing.T, c *Config) {
			c.NICs[0] = NIC{MAC: c.NICs[0].MAC, User: &UserNet{}}
		}},
		{name: "user networking becomes a tap", edit: func(t *testing.T, c *Config) {
			c.NICs[1] = NIC{MAC: c.NICs[1].MAC, Tap: testTap(t)}
		}},
		{name: "NIC kinds swap places", edit: func(_ *testing.T, c *Config) { c.NICs[0], c.NICs[1] = c.NICs[1], c.NICs[0] }},
		{name: "kernel modification time", edit: func(t *testing.T, c *Config) {
			old := time.Date(2001, 2, 3, 4, 5, 6, 7, time.UTC)
			if err := os.Chtimes(c.Kernel, old, old); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "initrd rewritten", edit: func(t *testing.T, c *Config) {
			if err := os.WriteFile(c.Initrd, []byte("another initramfs, of another size"), 0o644); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "qemu replaced by a rename", edit: func(t *testing.T, c *Config) {
			st, err := os.Stat(c.QEMUBinary)
			if err != nil {
				t.Fatal(err)
			}
			// Same content and modification time: only the inode differs.
			b, err := os.ReadFile(c.QEMUBinary)
			if err != nil {
				t.Fatal(err)
			}
			tmp := c.QEMUBinary + ".new"
			if err := os.WriteFile(tmp, b, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(tmp, st.ModTime(), st.ModTime()); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, c.QEMUBinary); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "kernel at another path", edit: func(t *testing.T, c *Config) {
			p := filepath.Join(t.TempDir(), "vmlinux")
			if err := os.Link(c.Kernel, p); err != nil {
				t.Fatal(err)
			}
			c.Kernel = p
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := shapeConfig(t)
			before := shapeKey(t, c, AccelTCG)
			if tt.edit != nil {
				tt.edit(t, c)
			}
			accel := tt.accel
			if accel == "" {
				accel = AccelTCG
			}
			if after := shapeKey(t, c, accel); after == before {
				t.Errorf("key stayed %s", before)
			}
		})
	}
}

func TestTemplateShapeNeedsItsFiles(t *testing.T) {
	c := shapeConfig(t)
	if err := os.Remove(c.Initrd); err != nil {
		t.Fatal(err)
	}
	if _, err := templateShape(c, AccelTCG); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), c.Initrd) {
		t.Fatalf("templateShape without its initrd: err = %v, want not-exist naming %s", err, c.Initrd)
	}
}

func TestQEMUArgsTemplateRoles(t *testing.T) {
	build := argsConfig()
	build.MemoryMiB = 512
	build.template = &templateUse{role: roleBuild, memory: "/t/a,b/memory", state: "/t/a,b/state"}
	clone := argsConfig()
	clone.MemoryMiB = 512
	clone.template = &templateUse{role: roleClone, memory: "/t/k/memory", state: "/t/k/state"}
	plain := argsConfig()

	fds := launchFDs{qmp: 3, agent: 4}
	tests := []struct {
		name     string
		c        *Config
		object   []string
		incoming []string
		machine  string
		balloon  string
	}{
		{
			name:    "build shares its RAM file",
			c:       build,
			object:  []string{"memory-backend-file,id=mem,size=512M,mem-path=/t/a,,b/memory,share=on"},
			machine: "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on,memory-backend=mem",
			balloon: "virtio-balloon-device,free-page-reporting=off",
		},
		{
			name:     "clone maps it privately and waits for its state",
			c:        clone,
			object:   []string{"memory-backend-file,id=mem,size=512M,mem-path=/t/k/memory,share=off"},
			incoming: []string{"defer"},
			machine:  "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on,memory-backend=mem",
			balloon:  "virtio-balloon-device,free-page-reporting=off",
		},
		{
			name:    "no template",
			c:       plain,
			machine: "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on",
			balloon: "virtio-balloon-device,free-page-reporting=on",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := qemuArgs(tt.c, AccelTCG, fds)
			if got := flagValues(args, "-object"); !slices.Equal(got, tt.object) {
				t.Errorf("-object = %q, want %q", got, tt.object)
			}
			if got := flagValues(args, "-incoming"); !slices.Equal(got, tt.incoming) {
				t.Errorf("-incoming = %q, want %q", got, tt.incoming)
			}
			if got := flagValues(args, "-M"); !slices.Equal(got, []string{tt.machine}) {
				t.Errorf("-M = %q, want %q", got, tt.machine)
			}
			if got := flagValues(args, "-device"); !slices.Contains(got, tt.balloon) {
				t.Errorf("-device = %q, want %q among them", got, tt.balloon)
			}
			if got := flagValues(args, "-m"); !slices.Equal(got, []string{strconv.Itoa(tt.c.MemoryMiB)}) {
				t.Errorf("-m = %q, want %d", got, tt.c.MemoryMiB)
			}
			// The memory backend comes before anything naming it is used.
			if tt.object != nil && slices.Index(args, "-object") > slices.Index(args, "-m") {
				t.Errorf("-object after -m: %q", args)
			}
		})
	}
}

func TestAssignFDs(t *testing.T) {
	tap, user := NIC{MAC: testMAC(1), Tap: testTap(t)}, NIC{MAC: testMAC(2), User: &UserNet{}}
	tests := []struct {
		name string
		nics []NIC
		taps []int
	}{
		{"none", nil, nil},
		{"user only", []NIC{user}, []int{-1}},
		{"taps in NIC order around user NICs", []NIC{tap, user, tap, user, tap}, []int{5, -1, 6, -1, 7}},
		{"user first", []NIC{user, tap}, []int{-1, 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fds := assignFDs(tt.nics)
			if fds.qmp != 3 || fds.agent != 4 || !slices.Equal(fds.taps, tt.taps) {
				t.Fatalf("assignFDs = %+v, want qmp 3, agent 4, taps %v", fds, tt.taps)
			}
		})
	}
}

func TestTemplateMACsAreDistinctLocalUnicast(t *testing.T) {
	seen := map[string]bool{}
	for i := range maxNICs {
		m := templateMAC(i)
		if len(m) != 6 || m[0]&1 != 0 || m[0]&2 == 0 {
			t.Errorf("templateMAC(%d) = %s: want a locally administered unicast address", i, m)
		}
		if seen[m.String()] {
			t.Errorf("templateMAC(%d) = %s repeats", i, m)
		}
		seen[m.String()] = true
	}
	if err := validateNICs([]NIC{{MAC: templateMAC(0), User: &UserNet{}}, {MAC: templateMAC(1), User: &UserNet{}}}); err != nil {
		t.Errorf("template MACs do not validate: %v", err)
	}
}

// testTemplateMiB is the RAM of the fake templates.
const testTemplateMiB = 32
