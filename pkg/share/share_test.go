package share

import (
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/mounttest"
)

// requireRoot skips the test unless it may mount.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run as root")
	}
}

// mountAt returns the topmost mount at exactly dir; it fails the test if
// there is none.
func mountAt(t *testing.T, dir string) mounttest.Mount {
	t.Helper()
	var found []mounttest.Mount
	for _, m := range mounttest.Under(t, dir) {
		if m.Point == dir {
			found = append(found, m)
		}
	}
	if len(found) == 0 {
		t.Fatalf("nothing is mounted at %s", dir)
	}
	return found[len(found)-1]
}

func isShared(m mounttest.Mount) bool {
	return slices.ContainsFunc(m.Optional, func(f string) bool { return strings.HasPrefix(f, "shared:") })
}

// testRoot returns a temporary directory for one test's sources and share,
// which must hold no mount when the test ends (mounttest.Root).
func testRoot(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	return mounttest.Root(t)
}

// newShare creates the share root/share, removed when the test ends (and
// the test fails unless Remove succeeds and takes the directory).
func newShare(t *testing.T, root string) *Share {
	t.Helper()
	dir := filepath.Join(root, "share")
	s, err := Create(dir)
	if err != nil {
		t.Fatalf("Create(%s): %v", dir, err)
	}
	t.Cleanup(func() { removeShare(t, dir) })
	return s
}

// removeShare removes the share at dir and checks that nothing of it is
// left.
func removeShare(t *testing.T, dir string) {
	t.Helper()
	if err := Remove(dir); err != nil {
		t.Errorf("Remove(%s): %v", dir, err)
	}
	if left := mounttest.Under(t, dir); len(left) > 0 {
		t.Errorf("still mounted under %s after Remove: %v", dir, left)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s exists after Remove: %v", dir, err)
	}
}

// mountTmpfs mounts a tmpfs at dir (made if missing), unmounted when the
// test ends; shared makes it a shared mount, as / is on a systemd host.
func mountTmpfs(t *testing.T, dir string, shared bool) {
	t.Helper()
	mounttest.Tmpfs(t, dir)
	if shared {
		if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
			t.Fatalf("make %s shared: %v", dir, err)
		}
	}
}

// writeFiles writes files (path relative to dir: content) under dir.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// readFile returns the content of path, failing the test if it cannot.
func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// tree returns the regular files under dir with their content.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := make(map[string]string)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		out[p] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCreateMountsAPrivateTmpfs(t *testing.T) {
	tests := []struct {
		name string
		// sharedParent puts the share under a shared mount, whose
		// children are shared unless made private.
		sharedParent bool
	}{
		{"under a private mount", false},
		{"under a shared mount", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := testRoot(t)
			parent := filepath.Join(root, "parent")
			mountTmpfs(t, parent, tt.sharedParent)
			dir := filepath.Join(parent, "share")
			s, err := Create(dir)
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			t.Cleanup(func() { removeShare(t, dir) })
			if s.Dir() != dir {
				t.Errorf("Dir() = %s, want %s", s.Dir(), dir)
			}
			under := mounttest.Under(t, dir)
			if len(under) != 1 {
				t.Fatalf("mounts under %s: %v, want the share's tmpfs only", dir, under)
			}
			m := under[0]
			if m.FSType != "tmpfs" {
				t.Errorf("%s is %s, want tmpfs", dir, m.FSType)
			}
			if isShared(m) {
				t.Errorf("%s is shared (%v), want private", dir, m.Optional)
			}
			for _, opt := range []string{"nosuid", "nodev"} {
				if !slices.Contains(m.Options, opt) {
					t.Errorf("%s options %v, want %s", dir, m.Options, opt)
				}
			}
			if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
				t.Errorf("new share holds %v (%v), want nothing", entries, err)
			}
		})
	}
}

func TestCreateReplacesAStaleShare(t *testing.T) {
	root := testRoot(t)
	src := filepath.Join(root, "src")
	writeFiles(t, src, map[string]string{"keep.txt": "host data", "sub/deep.txt": "deep"})
	before := tree(t, src)
	stale := newShare(t, root)
	if err := stale.Add(Bind{Source: src, Path: "c1/rootfs"}); err != nil {
		t.Fatal(err)
	}
	// A shim that was killed leaves its share; the next one creates it
	// again without a Remove.
	s, err := Create(stale.Dir())
	if err != nil {
		t.Fatalf("Create over a stale share: %v", err)
	}
	under := mounttest.Under(t, s.Dir())
	if len(under) != 1 || under[0].FSType != "tmpfs" {
		t.Errorf("mounts under %s: %v, want one tmpfs", s.Dir(), under)
	}
	if entries, err := os.ReadDir(s.Dir()); err != nil || len(entries) != 0 {
		t.Errorf("replaced share holds %v (%v), want nothing", entries, err)
	}
	if after := tree(t, src); !maps.Equal(after, before) {
		t.Errorf("source after replacing the share: %v, want %v", after, before)
	}
}

func TestCreateRefusesADirectoryThatHoldsFiles(t *testing.T) {
	root := testRoot(t)
	dir := filepath.Join(root, "share")
	writeFiles(t, dir, map[string]string{"precious.txt": "not a share's"})
	if _, err := Create(dir); err == nil {
		removeShare(t, dir)
		t.Fatal("Create over a directory with files succeeded")
	}
	if got := readFile(t, filepath.Join(dir, "precious.txt")); got != "not a share's" {
		t.Errorf("precious.txt = %q after Create", got)
	}
	if left := mounttest.Under(t, dir); len(left) > 0 {
		t.Errorf("mounted under %s: %v", dir, left)
	}
}

// Unbind takes one container's files out of a live share and leaves the
// others bound: a pod's app container is deleted while its VM runs on.
func TestUnbindRemovesOnlyThatPath(t *testing.T) {
	root := testRoot(t)
	a, b := filepath.Join(root, "a"), filepath.Join(root, "b")
	writeFiles(t, a, map[string]string{"f": "a"})
	writeFiles(t, b, map[string]string{"f": "b"})
	s := newShare(t, root)
	for _, bind := range []Bind{{Source: a, Path: "c/one/rootfs"}, {Source: a, Path: "c/one/m0", ReadOnly: true}, {Source: b, Path: "c/two/rootfs"}} {
		if err := s.Add(bind); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Unbind("c/one"); err != nil {
		t.Fatalf("Unbind: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(s.Dir(), "c/one")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("c/one after Unbind: %v; want it gone", err)
	}
	if got := readFile(t, filepath.Join(a, "f")); got != "a" {
		t.Errorf("the source of the removed bind reads %q: Unbind reached the host's files", got)
	}
	if got := readFile(t, filepath.Join(s.Dir(), "c/two/rootfs/f")); got != "b" {
		t.Errorf("the other container's rootfs reads %q after Unbind", got)
	}
	if err := s.Unbind("c/one"); err != nil {
		t.Errorf("second Unbind: %v; want nothing to do", err)
	}
	if err := s.Unbind("../x"); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Unbind(../x) = %v; want invalid argument", err)
	}
}

// A slave bind keeps receiving what is mounted under its source later (an
// rslave volume: the host's new mounts reach the guest); a private one
// does not.
func TestAddSlaveReceivesLaterMounts(t *testing.T) {
	root := testRoot(t)
	src := filepath.Join(root, "src")
	if err := os.MkdirAll(filepath.Join(src, "later"), 0o755); err != nil {
		t.Fatal(err)
	}
	mountTmpfs(t, src, true)
	if err := os.MkdirAll(filepath.Join(src, "later"), 0o755); err != nil {
		t.Fatal(err)
	}
	s := newShare(t, root)
	if err := s.Add(Bind{Source: src, Path: "c1/m0", Recursive: true, Slave: true}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(Bind{Source: src, Path: "c1/m1", Recursive: true}); err != nil {
		t.Fatal(err)
	}
	later := filepath.Join(src, "later")
	mountTmpfs(t, later, false)
	writeFiles(t, later, map[string]string{"flag": "mounted later"})
	if _, err := os.Stat(filepath.Join(s.Dir(), "c1/m0/later/flag")); err != nil {
		t.Errorf("the slave bind does not see a mount made after it: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), "c1/m1/later/flag")); err == nil {
		t.Error("the private bind sees a mount made after it")
	}
}
