// Package mounttest reads the test process's mount table, gives a test a
// directory to mount under that must hold no mount when the test ends, and
// mounts tmpfs for tests.
package mounttest

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	// Point is where it is mounted, with mountinfo's escapes undone.
	Point string
	// Options are its per-mount options (ro, nosuid, ...).
	Options []string
	// Optional are its propagation fields (shared:N, master:N, ...).
	Optional []string
	// FSType is the type of its filesystem.
	FSType string
}

// List returns the mounts of the test process, in mount order.
func List(t testing.TB) []Mount {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []Mount
	for line := range strings.Lines(string(data)) {
		before, after, ok := strings.Cut(strings.TrimSpace(line), " - ")
		fields, tail := strings.Fields(before), strings.Fields(after)
		if !ok || len(fields) < 6 || len(tail) < 1 {
			t.Fatalf("mountinfo line %q", line)
		}
		out = append(out, Mount{
			Point:    unescape(fields[4]),
			Options:  strings.Split(fields[5], ","),
			Optional: fields[6:],
			FSType:   tail[0],
		})
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Under returns the mounts at dir or below it, in mount order.
func Under(t testing.TB, dir string) []Mount {
	t.Helper()
	var out []Mount
	for _, m := range List(t) {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") {
			out = append(out, m)
		}
	}
	return out
}

// Root returns a new temporary directory (t.TempDir) for a test to mount
// under. When the test ends, the test fails if anything is still mounted
// at or below it, and what is gets detached, the last mount first, so that
// the removal of the directory can never delete through a bind mount.
func Root(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	t.Cleanup(func() {
		left := Under(t, root)
		if len(left) == 0 {
			return
		}
		t.Errorf("still mounted under %s: %v", root, left)
		for _, m := range slices.Backward(left) {
			unix.Unmount(m.Point, unix.MNT_DETACH)
		}
	})
	return root
}

// Tmpfs mounts a small tmpfs at dir (made if missing), unmounted when the
// test ends.
func Tmpfs(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
}
