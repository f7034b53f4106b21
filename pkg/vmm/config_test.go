package vmm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// validFiles creates a kernel, an initramfs, a rootfs and a state dir and
// returns a Config naming them, with a fake QEMU binary.
func validFiles(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	c := Config{
		Kernel:     filepath.Join(dir, KernelName),
		Initrd:     filepath.Join(dir, InitrdName),
		Share:      filepath.Join(dir, "rootfs"),
		StateDir:   filepath.Join(dir, "state"),
		QEMUBinary: os.Args[0],
		Accel:      AccelTCG,
	}
	for _, f := range []string{c.Kernel, c.Initrd} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{c.Share, c.StateDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func TestNewQEMUValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(t *testing.T, c *Config)
		is   error
		want string
	}{
		{name: "missing kernel", edit: func(t *testing.T, c *Config) { c.Kernel = "/nonexistent/vmlinux" },
			is: errdefs.ErrNotFound, want: "kernel /nonexistent/vmlinux missing: run make kernel"},
		{name: "kernel is a directory", edit: func(t *testing.T, c *Config) { c.Kernel = c.Share },
			is: errdefs.ErrInvalidArgument, want: "is not a regular file: run make kernel"},
		{name: "missing initrd", edit: func(t *testing.T, c *Config) { c.Initrd = "/nonexistent/initramfs.cpio" },
			is: errdefs.ErrNotFound, want: "initramfs /nonexistent/initramfs.cpio missing: run make initramfs"},
		{name: "missing qemu", edit: func(t *testing.T, c *Config) { c.QEMUBinary = ""; t.Setenv("PATH", t.TempDir()) },
			is: errdefs.ErrNotFound, want: "qemu-system-x86_64 not found: run make setup"},
		{name: "explicit qemu missing", edit: func(t *testing.T, c *Config) { c.QEMUBinary = "/nonexistent/qemu" },
			is: errdefs.ErrNotFound, want: "qemu binary /nonexistent/qemu"},
		{name: "share required", edit: func(t *testing.T, c *Config) { c.Share = "" },
			is: errdefs.ErrInvalidArgument, want: "share: a directory to share with the guest is required"},
		{name: "share missing", edit: func(t *testing.T, c *Config) { c.Share = "/nonexistent/rootfs" },
			is: errdefs.ErrNotFound, want: "share /nonexistent/rootfs"},
		{name: "share not a directory", edit: func(t *testing.T, c *Config) { c.Share = c.Kernel },
			is: errdefs.ErrInvalidArgument, want: "is not a directory"},
		{name: "state dir required", edit: func(t *testing.T, c *Config) { c.StateDir = "" },
			is: errdefs.ErrInvalidArgument, want: "state dir is required"},
		{name: "state dir missing", edit: func(t *testing.T, c *Config) { c.StateDir = "/nonexistent/state" },
			is: errdefs.ErrNotFound, want: "state dir /nonexistent/state"},
		{name: "state dir too long for sockets", edit: func(t *testing.T, c *Config) {
			c.StateDir = filepath.Join(c.StateDir, strings.Repeat("d", 100))
			if err := os.Mkdir(c.StateDir, 0o755); err != nil {
				t.Fatal(err)
			}
		}, is: errdefs.ErrInvalidArgument, want: "is too long: socket path"},
		{name: "negative vcpus", edit: func(t *testing.T, c *Config) { c.VCPUs = -1 },
			is: errdefs.ErrInvalidArgument, want: "vcpus -1"},
		{name: "too little memory", edit: func(t *testing.T, c *Config) { c.MemoryMiB = 8 },
			is: errdefs.ErrInvalidArgument, want: "memory 8 MiB"},
		{name: "tiny console log", edit: func(t *testing.T, c *Config) { c.ConsoleLogMax = 10 },
			is: errdefs.ErrInvalidArgument, want: "console log max 10 bytes"},
		{name: "unknown accelerator", edit: func(t *testing.T, c *Config) { c.Accel = "xen" },
			is: errdefs.ErrInvalidArgument, want: `accelerator "xen"`},
		{name: "forced kvm on a PVM host", edit: func(t *testing.T, c *Config) { c.Accel = AccelKVM; c.host = &Host{PVM: true} },
			is: errdefs.ErrFailedPrecondition, want: "PVM host"},
		{name: "kernel argument with a space", edit: func(t *testing.T, c *Config) { c.KernelArgs = []string{"a b"} },
			is: errdefs.ErrInvalidArgument, want: `kernel argument "a b"`},
		{name: "empty kernel argument", edit: func(t *testing.T, c *Config) { c.KernelArgs = []string{""} },
			is: errdefs.ErrInvalidArgument, want: `kernel argument ""`},
		{name: "kernel command line too long", edit: func(t *testing.T, c *Config) { c.KernelArgs = []string{strings.Repeat("x", 2000)} },
			is: errdefs.ErrInvalidArgument, want: "kernel command line is"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := validFiles(t)
			tc.edit(t, &c)
			_, err := NewQEMU(c)
			if !errors.Is(err, tc.is) || !strings.Contains(fmtErr(err), tc.want) {
				t.Errorf("NewQEMU() error = %v, want %v containing %q", err, tc.is, tc.want)
			}
		})
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestNewQEMUFillsDefaults(t *testing.T) {
	c := validFiles(t)
	c.Accel = ""
	c.host = &Host{PVM: true}
	q, err := NewQEMU(c)
	if err != nil {
		t.Fatal(err)
	}
	if q.cfg.VCPUs != DefaultVCPUs || q.cfg.MemoryMiB != DefaultMemoryMiB || q.cfg.ConsoleLogMax != DefaultConsoleLogMax {
		t.Errorf("defaults = %d vcpus, %d MiB, console %d", q.cfg.VCPUs, q.cfg.MemoryMiB, q.cfg.ConsoleLogMax)
	}
	if accel, reason := q.Accel(); accel != AccelTCG || !strings.Contains(reason, "PVM host") {
		t.Errorf("Accel() = %q, %q; want tcg because of PVM", accel, reason)
	}
	if got, want := q.AgentSocket(), filepath.Join(c.StateDir, AgentSocketName); got != want {
		t.Errorf("AgentSocket() = %q, want %q", got, want)
	}
}

func TestLocate(t *testing.T) {
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	for _, d := range dirs[1:] {
		if err := os.WriteFile(filepath.Join(d, KernelName), []byte("k"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		dirs    []string
		want    string
		errWant string
	}{
		{name: "first existing dir", dirs: dirs, want: filepath.Join(dirs[1], KernelName)},
		{name: "none found names the first place and the fix", dirs: dirs[:1],
			errWant: "kernel " + filepath.Join(dirs[0], KernelName) + " missing: run make kernel"},
		{name: "none found lists the other places", dirs: []string{dirs[0], "/nonexistent"},
			errWant: "(also looked in /nonexistent/vmlinux): run make kernel"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := locate("kernel", KernelName, tc.dirs, kernelFix)
			if tc.errWant != "" {
				if !errdefs.IsNotFound(err) || !strings.Contains(fmtErr(err), tc.errWant) {
					t.Fatalf("locate() error = %v, want not found containing %q", err, tc.errWant)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("locate() = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestFindImageOrder(t *testing.T) {
	c := validFiles(t)
	other := filepath.Join(t.TempDir(), "other-vmlinux")
	if err := os.WriteFile(other, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(KernelEnv, other)
	if got, err := FindKernel(""); err != nil || got != other {
		t.Errorf("FindKernel(\"\") with $%s = %q, %v; want %q", KernelEnv, got, err, other)
	}
	if got, err := FindKernel(c.Kernel); err != nil || got != c.Kernel {
		t.Errorf("FindKernel(%q) = %q, %v; an explicit path wins over the environment", c.Kernel, got, err)
	}
	t.Setenv(InitrdEnv, "/nonexistent/initrd")
	if _, err := FindInitrd(""); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "initramfs /nonexistent/initrd missing: run make initramfs") {
		t.Errorf("FindInitrd() with a missing $%s = %v; an explicit choice is never silently replaced", InitrdEnv, err)
	}
}
