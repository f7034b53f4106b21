package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
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

// fakeTemplate publishes a fake template of key under root as build would:
// a sparse RAM file, a device state, its meta, files 0444 in a 0555
// directory. edit, when set, runs before the meta is written and the modes
// are set. It returns the template's directory.
func fakeTemplate(t *testing.T, root, key string, edit func(dir string, m *TemplateMeta)) string {
	t.Helper()
	dir := filepath.Join(root, key)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Make it removable again, whatever the test did to it.
	t.Cleanup(func() { os.Chmod(dir, 0o700) })
	if err := createSized(filepath.Join(dir, templateMemory), testTemplateMiB<<20); err != nil {
		t.Fatal(err)
	}
	state := []byte(strings.Repeat("QEVM device state ", 300))
	if err := os.WriteFile(filepath.Join(dir, templateState), state, 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(state)
	m := TemplateMeta{Key: key, Format: templateFormat, MemoryMiB: testTemplateMiB, Accel: AccelTCG, VCPUs: 1,
		StateSHA256: hex.EncodeToString(sum[:]), StateSize: int64(len(state))}
	if edit != nil {
		edit(dir, &m)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, templateMeta), b, 0o400); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{templateMemory, templateState, templateMeta} {
		p := filepath.Join(dir, name)
		if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() {
			if err := os.Chmod(p, 0o444); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestOpenTemplateAcceptsAPublishedTemplate(t *testing.T) {
	dir := fakeTemplate(t, t.TempDir(), "0123456789abcdef", nil)
	tm, err := openTemplate(dir, "0123456789abcdef")
	if err != nil {
		t.Fatalf("openTemplate: %v", err)
	}
	if tm.dir != dir || tm.meta.Key != "0123456789abcdef" || tm.meta.MemoryMiB != testTemplateMiB {
		t.Fatalf("openTemplate = %+v", tm)
	}
	// The owner may keep write permission for itself.
	if err := os.Chmod(filepath.Join(dir, templateMemory), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := openTemplate(dir, "0123456789abcdef"); err != nil {
		t.Fatalf("memory 0644: %v", err)
	}
}

func TestOpenTemplateRefusesWhatItCannotTrust(t *testing.T) {
	const key = "0123456789abcdef"
	// Edits of the template's content, made before it is published.
	writeState := func(b func([]byte) []byte) func(string, *TemplateMeta) {
		return func(dir string, _ *TemplateMeta) {
			p := filepath.Join(dir, templateState)
			old, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b(old), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name string
		// edit changes the template before it is published.
		edit func(dir string, m *TemplateMeta)
		// after changes it once it is published.
		after func(t *testing.T, dir string)
		// key is the key asked for (default key).
		key string
		// want is in the error.
		want string
		// is the error must match (optional).
		is error
	}{
		{
			name: "state with one byte changed",
			edit: writeState(func(b []byte) []byte { b = slices.Clone(b); b[len(b)/2] ^= 1; return b }),
			want: "damaged",
		},
		{
			name: "truncated state",
			edit: writeState(func(b []byte) []byte { return b[:len(b)-1] }),
			want: "damaged",
		},
		{
			name: "state longer than recorded",
			edit: writeState(func(b []byte) []byte { return append(slices.Clone(b), 0) }),
			want: "damaged",
		},
		{
			name: "meta records another state size",
			edit: func(_ string, m *TemplateMeta) { m.StateSize-- },
			want: "damaged",
		},
		{
			name: "memory of the wrong size",
			edit: func(dir string, _ *TemplateMeta) {
				if err := os.Truncate(filepath.Join(dir, templateMemory), testTemplateMiB<<20-4096); err != nil {
					t.Fatal(err)
				}
			},
			want: "want 33554432",
		},
		{
			name: "meta claims another memory size",
			edit: func(_ string, m *TemplateMeta) { m.MemoryMiB = 64 },
			want: "want 67108864",
		},
		{
			name: "memory writable by everyone",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateMemory), 0o666)
			},
			want: "others could write into every clone",
		},
		{
			name: "memory writable by its group",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateMemory), 0o460)
			},
			want: "others could write into every clone",
		},
		{
			name: "state writable by others",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateState), 0o446)
			},
			want: "others could write into every clone",
		},
		{
			name:  "directory writable by everyone",
			after: func(t *testing.T, dir string) { chmod(t, dir, 0o777) },
			want:  "others could write into every clone",
		},
		{
			name: "meta of another key",
			key:  "fedcba9876543210",
			want: "is of template " + key,
		},
		{
			name: "meta of another format",
			edit: func(_ string, m *TemplateMeta) { m.Format = templateFormat + 1 },
			want: "format",
		},
		{
			name: "no meta",
			after: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, templateMeta)); err != nil {
					t.Fatal(err)
				}
			},
			want: templateMeta,
			is:   fs.ErrNotExist,
		},
		{
			name: "garbage meta",
			after: func(t *testing.T, dir string) {
				p := filepath.Join(dir, templateMeta)
				chmod(t, p, 0o644)
				if err := os.WriteFile(p, []byte("{not json"), 0o644); err != nil {
					t.Fatal(err)
				}
				chmod(t, p, 0o444)
			},
			want: templateMeta,
		},
		{
			name: "memory is a symlink to a file of the right size",
			edit: func(dir string, _ *TemplateMeta) {
				p := filepath.Join(dir, templateMemory)
				elsewhere := filepath.Join(t.TempDir(), "memory")
				if err := createSized(elsewhere, testTemplateMiB<<20); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(elsewhere, 0o444); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(elsewhere, p); err != nil {
					t.Fatal(err)
				}
			},
			want: "not a regular file",
		},
		{
			name: "memory is a directory",
			edit: func(dir string, _ *TemplateMeta) {
				p := filepath.Join(dir, templateMemory)
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(p, 0o555); err != nil {
					t.Fatal(err)
				}
			},
			want: "not a regular file",
		},
		{
			name: "no state",
			edit: func(dir string, _ *TemplateMeta) {
				if err := os.Remove(filepath.Join(dir, templateState)); err != nil {
					t.Fatal(err)
				}
			},
			want: templateState,
			is:   fs.ErrNotExist,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := fakeTemplate(t, t.TempDir(), key, tt.edit)
			if tt.after != nil {
				tt.after(t, dir)
			}
			k := tt.key
			if k == "" {
				k = key
			}
			tm, err := openTemplate(dir, k)
			if err == nil {
				t.Fatalf("openTemplate = %+v, want an error", tm)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.is)
			}
		})
	}
}

// A template directory that does not exist reads as not built: ensure
// builds it rather than removing anything.
func TestOpenTemplateOfAMissingDirectoryIsNotExist(t *testing.T) {
	_, err := openTemplate(filepath.Join(t.TempDir(), "0123456789abcdef"), "0123456789abcdef")
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
}

func TestOpenTemplateRefusesAnotherUsersFiles(t *testing.T) {
	needRoot(t)
	const key = "0123456789abcdef"
	for _, name := range []string{"", templateMemory, templateState} {
		t.Run("owner of "+filepath.Join("template", name), func(t *testing.T) {
			dir := fakeTemplate(t, t.TempDir(), key, nil)
			if err := os.Lchown(filepath.Join(dir, name), 65534, 65534); err != nil {
				t.Fatal(err)
			}
			if _, err := openTemplate(dir, key); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
				t.Fatalf("err = %v, want a refusal naming uid 65534", err)
			}
		})
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func TestTemplateMetaStale(t *testing.T) {
	dir := t.TempDir()
	files := []string{filepath.Join(dir, "qemu"), filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")}
	fresh := func(t *testing.T) *TemplateMeta {
		t.Helper()
		m := &TemplateMeta{Files: map[string]string{}}
		for _, p := range files {
			if err := os.WriteFile(p, []byte("v1 of "+p), 0o644); err != nil {
				t.Fatal(err)
			}
			id, err := fileIdentity(p)
			if err != nil {
				t.Fatal(err)
			}
			m.Files[p] = id
		}
		return m
	}
	if (&TemplateMeta{}).Stale() {
		t.Error("a meta without files is stale")
	}
	tests := []struct {
		name  string
		edit  func(t *testing.T)
		stale bool
	}{
		{"unchanged", func(*testing.T) {}, false},
		{"read", func(t *testing.T) {
			if _, err := os.ReadFile(files[0]); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"rewritten", func(t *testing.T) {
			if err := os.WriteFile(files[1], []byte("v2, longer than v1 of it"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"touched", func(t *testing.T) {
			old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
			if err := os.Chtimes(files[2], old, old); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"removed", func(t *testing.T) {
			if err := os.Remove(files[0]); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"replaced by a rename", func(t *testing.T) {
			st, err := os.Stat(files[1])
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(files[1])
			tmp := files[1] + ".new"
			if err := os.WriteFile(tmp, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(tmp, st.ModTime(), st.ModTime()); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, files[1]); err != nil {
				t.Fatal(err)
			}
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := fresh(t)
			if m.Stale() {
				t.Fatal("stale right after its identities were recorded")
			}
			tt.edit(t)
			if got := m.Stale(); got != tt.stale {
				t.Fatalf("Stale() = %v, want %v", got, tt.stale)
			}
		})
	}
}

// lockCtx is a context for an attempt to take a lock.
func lockCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// lockWithin runs lockFile bounded by a context of d, and fails the test if
// it does not return soon after that deadline: a lockFile that ignored its
// context would otherwise hang the suite.
func lockWithin(t *testing.T, path string, d time.Duration) (func(), error) {
	t.Helper()
	type result struct {
		unlock func()
		err    error
	}
	ch := make(chan result, 1)
	ctx := lockCtx(t, d)
	go func() {
		u, err := lockFile(ctx, path)
		ch <- result{u, err}
	}()
	select {
	case r := <-ch:
		return r.unlock, r.err
	case <-time.After(d + 5*time.Second):
		t.Fatalf("lockFile(%s) still waiting 5s after its deadline of %v", path, d)
		return nil, nil
	}
}

func TestLockFileExcludesAndHandsOver(t *testing.T) {
	checkLeaks(t)
	path := filepath.Join(t.TempDir(), ".lock-k")
	unlock, err := lockWithin(t, path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Held: another locker cannot have it before its deadline.
	if u, err := lockWithin(t, path, 100*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		if u != nil {
			u()
		}
		t.Fatalf("second lockFile while held: err = %v, want DeadlineExceeded", err)
	}

	var released atomic.Bool
	type result struct {
		unlock       func()
		err          error
		afterRelease bool
	}
	got := make(chan result, 1)
	go func() {
		u, err := lockFile(lockCtx(t, 10*time.Second), path)
		got <- result{u, err, released.Load()}
	}()
	select {
	case r := <-got:
		if r.unlock != nil {
			r.unlock()
		}
		t.Fatalf("second locker got the lock while the first held it (err %v)", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	released.Store(true)
	unlock()
	var r result
	select {
	case r = <-got:
	case <-time.After(15 * time.Second):
		t.Fatal("second locker did not get the lock after the first released it")
	}
	if r.err != nil {
		t.Fatalf("second locker after unlock: %v", r.err)
	}
	if !r.afterRelease {
		t.Fatal("second locker got the lock before the first released it")
	}
	// It holds it now.
	if _, err := lockWithin(t, path, 50*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("third lockFile while the second holds it: err = %v", err)
	}
	r.unlock()
	u, err := lockWithin(t, path, 5*time.Second)
	if err != nil {
		t.Fatalf("lockFile after both unlocked: %v", err)
	}
	u()
}

func TestLockFileCanceledWaitLeavesTheLockFree(t *testing.T) {
	for _, early := range []bool{false, true} {
		name := map[bool]string{false: "canceled while waiting", true: "canceled before the call"}[early]
		t.Run(name, func(t *testing.T) {
			checkLeaks(t)
			path := filepath.Join(t.TempDir(), ".lock-k")
			unlock, err := lockWithin(t, path, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if early {
				cancel()
			}
			done := make(chan error, 1)
			go func() {
				u, err := lockFile(ctx, path)
				if u != nil {
					u()
				}
				done <- err
			}()
			if !early {
				select {
				case err := <-done:
					t.Fatalf("lockFile returned while the lock was held and ctx live: %v", err)
				case <-time.After(50 * time.Millisecond):
				}
				cancel()
			}
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("err = %v, want context.Canceled", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("lockFile did not return once its ctx was canceled")
			}
			unlock()
			// The abandoned wait must not end up holding the lock.
			u, err := lockWithin(t, path, 5*time.Second)
			if err != nil {
				t.Fatalf("lockFile after the canceled wait: %v", err)
			}
			u()
		})
	}
}

func TestLockFileReportsAnUnusablePath(t *testing.T) {
	if _, err := lockFile(context.Background(), filepath.Join(t.TempDir(), "missing", ".lock-k")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
}

func TestRemoveTemplateRefusesWhatIsNotAKey(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "templates")
	victim := filepath.Join(base, "victim")
	for _, d := range []string{root, victim} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, key := range []string{"", ".", "..", "../victim", "a/b", "/", ".lock-x", ".build-1", "abc.def"} {
		t.Run(key, func(t *testing.T) {
			if err := RemoveTemplate(root, key); err == nil || !strings.Contains(err.Error(), "not a template key") {
				t.Fatalf("RemoveTemplate(%q) = %v, want a refusal", key, err)
			}
		})
	}
	for _, d := range []string{root, victim} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s: %v", d, err)
		}
	}
}

func TestRemoveTemplate(t *testing.T) {
	root := t.TempDir()
	dir := fakeTemplate(t, root, "0123456789abcdef", nil)
	other := fakeTemplate(t, root, "fedcba9876543210", nil)
	if err := RemoveTemplate(root, "0123456789abcdef"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("template still there: %v", err)
	}
	if _, err := openTemplate(other, "fedcba9876543210"); err != nil {
		t.Fatalf("the other template was harmed: %v", err)
	}
	// The lock file stays for builders that wait on it.
	if _, err := os.Stat(filepath.Join(root, templateLockPrefix+"0123456789abcdef")); err != nil {
		t.Errorf("lock file: %v", err)
	}
	if err := RemoveTemplate(root, "0123456789abcdef"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("removing it again: err = %v, want fs.ErrNotExist", err)
	}
}

func TestRemoveTemplateWaitsForItsBuilders(t *testing.T) {
	checkLeaks(t)
	root := t.TempDir()
	dir := fakeTemplate(t, root, "0123456789abcdef", nil)
	unlock, err := lockWithin(t, filepath.Join(root, templateLockPrefix+"0123456789abcdef"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var released atomic.Bool
	type result struct {
		err          error
		afterRelease bool
	}
	done := make(chan result, 1)
	go func() {
		err := RemoveTemplate(root, "0123456789abcdef")
		done <- result{err, released.Load()}
	}()
	select {
	case r := <-done:
		unlock()
		t.Fatalf("RemoveTemplate returned (%v) while a builder held the lock", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("template removed under its builder's lock: %v", err)
	}
	released.Store(true)
	unlock()
	select {
	case r := <-done:
		if r.err != nil || !r.afterRelease {
			t.Fatalf("RemoveTemplate = %v (after release: %v)", r.err, r.afterRelease)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RemoveTemplate did not return after the lock was released")
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("template still there: %v", err)
	}
}

func TestListTemplates(t *testing.T) {
	if metas, sizes, err := ListTemplates(filepath.Join(t.TempDir(), "missing")); err != nil || metas != nil || sizes != nil {
		t.Fatalf("ListTemplates of a missing root = %v, %v, %v; want nothing", metas, sizes, err)
	}
	root := t.TempDir()
	fakeTemplate(t, root, "aaaaaaaaaaaaaaaa", nil)
	fakeTemplate(t, root, "cccccccccccccccc", nil)
	// A directory without a meta is listed by its name.
	if err := os.Mkdir(filepath.Join(root, "bbbbbbbbbbbbbbbb"), 0o700); err != nil {
		t.Fatal(err)
	}
	// Builds in progress, locks, other hidden entries and plain files are not.
	for _, d := range []string{".build-123", ".hidden"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, ".build-123", templateMeta), []byte(`{"key":"dddddddddddddddd"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{templateLockPrefix + "aaaaaaaaaaaaaaaa", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	metas, sizes, err := ListTemplates(root)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, m := range metas {
		keys = append(keys, m.Key)
	}
	if want := []string{"aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"}; !slices.Equal(keys, want) {
		t.Fatalf("keys = %q, want %q", keys, want)
	}
	if metas[0].MemoryMiB != testTemplateMiB || metas[0].StateSize == 0 {
		t.Errorf("meta of aaaa… = %+v, want the published one", metas[0])
	}
	if len(sizes) != 3 {
		t.Fatalf("sizes = %v, want 3", sizes)
	}
	// The RAM file is sparse: a template takes the blocks its files use.
	if sizes[0] < metas[0].StateSize || sizes[0] >= testTemplateMiB<<20 {
		t.Errorf("size of aaaa… = %d, want at least the state's %d bytes and less than the RAM's apparent size",
			sizes[0], metas[0].StateSize)
	}
	if sizes[1] != 0 {
		t.Errorf("size of an empty directory = %d", sizes[1])
	}
}

// ensure uses a published template of the config's shape as it is, and
// removes one it cannot trust before building it again.
func TestTemplatesEnsure(t *testing.T) {
	c := shapeConfig(t)
	c.NICs = []NIC{{MAC: testMAC(2), User: &UserNet{}}}
	shape, err := templateShape(c, AccelTCG)
	if err != nil {
		t.Fatal(err)
	}
	ready := func(context.Context, string) error {
		t.Error("ensure built a template")
		return errors.New("no builds here")
	}

	t.Run("published", func(t *testing.T) {
		root := t.TempDir()
		dir := fakeTemplate(t, root, shape.Key, nil)
		ts := &Templates{Dir: root, Ready: ready}
		tm, err := ts.ensure(testCtx(t, 10*time.Second), c, AccelTCG)
		if err != nil {
			t.Fatal(err)
		}
		if tm.dir != dir || tm.meta.Key != shape.Key {
			t.Fatalf("ensure = %+v, want the template in %s", tm, dir)
		}
	})

	t.Run("damaged", func(t *testing.T) {
		root := t.TempDir()
		dir := fakeTemplate(t, root, shape.Key, func(_ string, m *TemplateMeta) { m.StateSize++ })
		// The rebuild fails early here: the "QEMU binary" is not executable.
		ts := &Templates{Dir: root, Ready: ready}
		_, err := ts.ensure(testCtx(t, 10*time.Second), c, AccelTCG)
		if err == nil || !strings.Contains(err.Error(), "build VM template "+shape.Key) || !strings.Contains(err.Error(), c.QEMUBinary) {
			t.Fatalf("err = %v, want a build that failed on %s", err, c.QEMUBinary)
		}
		if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("damaged template kept: %v", err)
		}
		if left, _ := filepath.Glob(filepath.Join(root, templateBuildPrefix+"*")); len(left) != 0 {
			t.Fatalf("failed build left %v", left)
		}
	})
}
