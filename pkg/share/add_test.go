package share

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/mounttest"
)

func TestAddBindsADirectory(t *testing.T) {
	root := testRoot(t)
	src := filepath.Join(root, "src")
	writeFiles(t, src, map[string]string{"etc/os-release": "ID=test"})
	s := newShare(t, root)
	if err := s.Add(Bind{Source: src, Path: "c1/rootfs"}); err != nil {
		t.Fatalf("Add: %v", err)
	}
	shared := filepath.Join(s.Dir(), "c1/rootfs")
	mountAt(t, shared)
	if got := readFile(t, filepath.Join(shared, "etc/os-release")); got != "ID=test" {
		t.Errorf("through the share: %q, want the source's", got)
	}
	writeFiles(t, src, map[string]string{"later.txt": "from the host"})
	if got := readFile(t, filepath.Join(shared, "later.txt")); got != "from the host" {
		t.Errorf("a file written on the host after Add reads %q through the share", got)
	}
	writeFiles(t, shared, map[string]string{"guest.txt": "from the guest"})
	if got := readFile(t, filepath.Join(src, "guest.txt")); got != "from the guest" {
		t.Errorf("a file written through the share reads %q in the source", got)
	}
}

func TestAddBindsAFile(t *testing.T) {
	root := testRoot(t)
	src := filepath.Join(root, "hosts")
	writeFiles(t, root, map[string]string{"hosts": "127.0.0.1 localhost\n"})
	s := newShare(t, root)
	if err := s.Add(Bind{Source: src, Path: "c1/etc/hosts"}); err != nil {
		t.Fatalf("Add: %v", err)
	}
	shared := filepath.Join(s.Dir(), "c1/etc/hosts")
	if st, err := os.Stat(shared); err != nil || !st.Mode().IsRegular() {
		t.Fatalf("%s: %v, %v; want a regular file", shared, st, err)
	}
	mountAt(t, shared)
	if got := readFile(t, shared); got != "127.0.0.1 localhost\n" {
		t.Errorf("through the share: %q", got)
	}
	if err := os.WriteFile(shared, []byte("10.0.0.2 box\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, src); got != "10.0.0.2 box\n" {
		t.Errorf("the source after a write through the share: %q", got)
	}
}

func TestAddReadOnlyRefusesWritesThroughTheShare(t *testing.T) {
	tests := []struct {
		name string
		dir  bool
	}{
		{"directory", true},
		{"file", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := testRoot(t)
			src, file := filepath.Join(root, "src"), filepath.Join(root, "src", "data.txt")
			writeFiles(t, src, map[string]string{"data.txt": "original"})
			if !tt.dir {
				src = file
			}
			s := newShare(t, root)
			if err := s.Add(Bind{Source: src, Path: "ro", ReadOnly: true}); err != nil {
				t.Fatalf("Add: %v", err)
			}
			shared := filepath.Join(s.Dir(), "ro")
			if m := mountAt(t, shared); !slices.Contains(m.Options, "ro") {
				t.Errorf("%s options %v, want ro", shared, m.Options)
			}
			through := shared
			if tt.dir {
				through = filepath.Join(shared, "data.txt")
				if err := os.WriteFile(filepath.Join(shared, "new.txt"), nil, 0o644); !errors.Is(err, unix.EROFS) {
					t.Errorf("create through the read-only share: %v, want EROFS", err)
				}
			}
			if err := os.WriteFile(through, []byte("changed"), 0o644); !errors.Is(err, unix.EROFS) {
				t.Errorf("write through the read-only share: %v, want EROFS", err)
			}
			// The source itself stays writable.
			if err := os.WriteFile(file, []byte("updated on the host"), 0o644); err != nil {
				t.Fatalf("write the source: %v", err)
			}
			if got := readFile(t, through); got != "updated on the host" {
				t.Errorf("through the share: %q, want the host's update", got)
			}
		})
	}
}

func TestAddRecursiveBindsSubmounts(t *testing.T) {
	tests := []struct {
		name      string
		recursive bool
		readOnly  bool
	}{
		{"bind", false, false},
		{"rbind", true, false},
		{"read-only bind", false, true},
		{"read-only rbind", true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := testRoot(t)
			src := filepath.Join(root, "src")
			writeFiles(t, src, map[string]string{"top.txt": "top"})
			mountTmpfs(t, filepath.Join(src, "sub"), false)
			writeFiles(t, src, map[string]string{"sub/inner.txt": "inner"})
			s := newShare(t, root)
			b := Bind{Source: src, Path: "vol", Recursive: tt.recursive, ReadOnly: tt.readOnly}
			if err := s.Add(b); err != nil {
				t.Fatalf("Add(%+v): %v", b, err)
			}
			shared := filepath.Join(s.Dir(), "vol")
			if got := readFile(t, filepath.Join(shared, "top.txt")); got != "top" {
				t.Errorf("top.txt through the share: %q", got)
			}
			inner := filepath.Join(shared, "sub", "inner.txt")
			_, err := os.Stat(inner)
			if visible := err == nil; visible != tt.recursive {
				t.Fatalf("the submount's file through the share: %v; want visible only with Recursive", err)
			}
			for _, p := range []string{filepath.Join(shared, "top.txt"), inner} {
				if !tt.recursive && p == inner {
					continue
				}
				// "ro" makes the bind read-only, not its submounts, as
				// with runc (the shim shares a volume's submounts on their
				// own, read-only for "rro").
				ro := tt.readOnly && p != inner
				err := os.WriteFile(p, []byte("changed"), 0o644)
				if ro && !errors.Is(err, unix.EROFS) {
					t.Errorf("write %s through a read-only share: %v, want EROFS", p, err)
				}
				if !ro && err != nil {
					t.Errorf("write %s through the share: %v", p, err)
				}
			}
			// The source's own submount stays writable.
			if err := os.WriteFile(filepath.Join(src, "sub", "inner.txt"), []byte("host"), 0o644); err != nil {
				t.Errorf("write the source's submount: %v", err)
			}
		})
	}
}

// TestAddKeepsBindsPrivate binds a source that is on a shared mount (as
// everything is on a systemd host): nothing mounted under the source later
// may appear in the share, and nothing bound inside the share may appear
// in the source.
func TestAddKeepsBindsPrivate(t *testing.T) {
	tests := []struct {
		name      string
		recursive bool
	}{
		{"bind", false},
		{"rbind", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := testRoot(t)
			src := filepath.Join(root, "src")
			mountTmpfs(t, src, true)
			writeFiles(t, src, map[string]string{"later/.keep": ""})
			other := filepath.Join(root, "other")
			writeFiles(t, other, map[string]string{"other.txt": "other"})
			s := newShare(t, root)
			if err := s.Add(Bind{Source: src, Path: "vol", Recursive: tt.recursive}); err != nil {
				t.Fatal(err)
			}
			shared := filepath.Join(s.Dir(), "vol")
			if m := mountAt(t, shared); isShared(m) {
				t.Errorf("the bind at %s is shared (%v), want private", shared, m.Optional)
			}
			// The host mounts something in the source.
			mountTmpfs(t, filepath.Join(src, "later"), false)
			writeFiles(t, src, map[string]string{"later/arrived.txt": "host mount"})
			if _, err := os.Stat(filepath.Join(shared, "later", "arrived.txt")); err == nil {
				t.Errorf("a mount made in the source after Add appeared in the share")
			}
			// A bind inside the first one stays in the share (its
			// mount point is made in the source, through the first).
			if err := s.Add(Bind{Source: other, Path: "vol/nested"}); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(src, "nested", "other.txt")); err == nil {
				t.Errorf("a bind made inside the share appeared in the source")
			}
			if left := mounttest.Under(t, filepath.Join(src, "nested")); len(left) > 0 {
				t.Errorf("mounted in the source: %v", left)
			}
		})
	}
}

func TestAddRefusesWhatCannotBeShared(t *testing.T) {
	root := testRoot(t)
	okDir := filepath.Join(root, "ok")
	writeFiles(t, okDir, map[string]string{"f": ""})
	link := func(name, target string) string {
		p := filepath.Join(root, name)
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sock := filepath.Join(root, "sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	fifo := filepath.Join(root, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		bind Bind
		is   func(error) bool
		// names is what the error must name.
		names string
	}{
		{"relative source", Bind{Source: "relative/dir", Path: "a"}, errdefs.IsInvalidArgument, "relative/dir"},
		{"missing source", Bind{Source: filepath.Join(root, "missing"), Path: "a"}, errdefs.IsNotFound, filepath.Join(root, "missing")},
		{"dangling symlink", Bind{Source: link("dangling", filepath.Join(root, "gone")), Path: "a"}, errdefs.IsNotFound, filepath.Join(root, "dangling")},
		{"/proc", Bind{Source: "/proc", Path: "a"}, errdefs.IsInvalidArgument, "/proc"},
		{"/proc/self", Bind{Source: "/proc/self", Path: "a"}, errdefs.IsInvalidArgument, "/proc/self"},
		{"/sys/kernel", Bind{Source: "/sys/kernel", Path: "a"}, errdefs.IsInvalidArgument, "/sys/kernel"},
		{"symlink to /proc", Bind{Source: link("proc-link", "/proc"), Path: "a"}, errdefs.IsInvalidArgument, filepath.Join(root, "proc-link")},
		{"symlink into /sys", Bind{Source: link("sys-link", "/sys/kernel"), Path: "a"}, errdefs.IsInvalidArgument, filepath.Join(root, "sys-link")},
		{"unix socket", Bind{Source: sock, Path: "a"}, errdefs.IsInvalidArgument, sock},
		{"fifo", Bind{Source: fifo, Path: "a"}, errdefs.IsInvalidArgument, fifo},
		{"device", Bind{Source: "/dev/null", Path: "a"}, errdefs.IsInvalidArgument, "/dev/null"},
		{"path with ..", Bind{Source: okDir, Path: "../escape"}, errdefs.IsInvalidArgument, "../escape"},
		{"path with .. inside", Bind{Source: okDir, Path: "a/../../escape"}, errdefs.IsInvalidArgument, "a/../../escape"},
		{"absolute path", Bind{Source: okDir, Path: "/etc/hosts"}, errdefs.IsInvalidArgument, "/etc/hosts"},
		{"empty path", Bind{Source: okDir, Path: ""}, errdefs.IsInvalidArgument, `""`},
	}
	s := newShare(t, root)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Add(tt.bind)
			if err == nil {
				t.Fatalf("Add(%+v) succeeded", tt.bind)
			}
			if !tt.is(err) {
				t.Errorf("Add(%+v) = %v, of the wrong class", tt.bind, err)
			}
			if !strings.Contains(err.Error(), tt.names) {
				t.Errorf("Add(%+v) = %q, which does not name %s", tt.bind, err, tt.names)
			}
			// Refused before anything is made or mounted.
			if entries, err := os.ReadDir(s.Dir()); err != nil || len(entries) != 0 {
				t.Errorf("the share holds %v (%v) after a refusal", entries, err)
			}
			if under := mounttest.Under(t, s.Dir()); len(under) != 1 {
				t.Errorf("mounts under the share after a refusal: %v", under)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(root, "escape")); err == nil {
		t.Error("a refused Add made a file outside the share")
	}
}
