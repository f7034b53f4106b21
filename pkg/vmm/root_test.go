package vmm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountsUnder returns the mount points at or below dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	return out
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts): run as root")
	}
}

// The VMM's root is an empty read-only tmpfs whose only content is a
// procfs without /proc/sys: nothing of the host can be written or read
// through /proc/<vmm pid>/root, yet /proc/self/fd works for 9p.
func TestMakeRootIsEmptyReadOnlyWithAPidOnlyProc(t *testing.T) {
	needRoot(t)
	dir := filepath.Join(t.TempDir(), RootDirName)
	if err := makeRoot(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRoot(dir) })
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "proc" {
		t.Errorf("root holds %v, want only proc", entries)
	}
	if err := os.WriteFile(filepath.Join(dir, "passwd"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write in the root: %v, want EROFS", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "proc", "sys")); err == nil {
		t.Error("the root's procfs has /proc/sys")
	}
	if _, err := os.Stat(filepath.Join(dir, "proc", "self", "fd")); err != nil {
		t.Errorf("the root's procfs has no /proc/self/fd: %v", err)
	}
	if err := removeRoot(dir); err != nil {
		t.Fatal(err)
	}
	if m := mountsUnder(t, dir); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("root directory left: %v", err)
	}
}

// QEMU is told to chroot into the root, which exists while it runs and is
// gone once it was reaped; KillStale (the delete action after a shim was
// killed) removes a root left behind.
func TestVMMRunsChrootedAndItsRootGoesWithIt(t *testing.T) {
	needRoot(t)
	q := fakeVM(t, "ok", nil)
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile(procPid(q) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(q.cfg.StateDir, RootDirName)
	if got := flagValues(strings.Split(string(cmdline), "\x00"), "-chroot"); len(got) != 1 || got[0] != root {
		t.Errorf("-chroot = %q, want %s", got, root)
	}
	if m := mountsUnder(t, root); len(m) != 2 {
		t.Errorf("while the VMM runs, mounts under its root: %v, want the tmpfs and its proc", m)
	}
	if err := q.Stop(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("after the VMM was reaped, mounts left: %v", m)
	}

	stale := t.TempDir()
	if err := makeRoot(filepath.Join(stale, RootDirName)); err != nil {
		t.Fatal(err)
	}
	if _, err := KillStale(context.Background(), stale); err != nil {
		t.Fatal(err)
	}
	if m := mountsUnder(t, stale); len(m) > 0 {
		t.Errorf("KillStale left %v", m)
	}
}
