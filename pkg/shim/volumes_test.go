package shim

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/internal/mounttest"
	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/share"
)

func TestReadOnlyLastOfRoAndRwWins(t *testing.T) {
	for _, tc := range []struct {
		opts []string
		want bool
	}{
		{opts: nil, want: false},
		{opts: []string{"rbind"}, want: false},
		{opts: []string{"rbind", "ro"}, want: true},
		{opts: []string{"ro", "rw"}, want: false},
		{opts: []string{"rw", "nosuid", "ro"}, want: true},
		{opts: []string{"ro", "rw", "ro"}, want: true},
		{opts: []string{"rro", "readonly"}, want: false},
	} {
		if got := readOnly(tc.opts); got != tc.want {
			t.Errorf("readOnly(%q) = %v, want %v", tc.opts, got, tc.want)
		}
	}
}

func TestIsBindMountFollowsRunc(t *testing.T) {
	for _, tc := range []struct {
		m    specs.Mount
		want bool
	}{
		{m: specs.Mount{Type: "bind"}, want: true},
		{m: specs.Mount{Type: "none", Options: []string{"rbind", "ro"}}, want: true},
		{m: specs.Mount{Options: []string{"bind"}}, want: true},
		{m: specs.Mount{Type: "proc"}},
		{m: specs.Mount{Type: "tmpfs", Options: []string{"nosuid", "mode=755"}}},
		{m: specs.Mount{Type: "cgroup", Options: []string{"ro"}}},
		{m: specs.Mount{Type: "devpts", Options: []string{"newinstance"}}},
	} {
		if got := isBindMount(tc.m); got != tc.want {
			t.Errorf("isBindMount(%+v) = %v, want %v", tc.m, got, tc.want)
		}
	}
}

// mountpoints returns the mount points at dir or below it, as
// /proc/self/mountinfo lists them (escapes undone), with each one's
// per-mount options.
func mountpoints(t *testing.T, dir string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, m := range mounttest.Under(t, dir) {
		out[m.Point] = m.Options
	}
	return out
}

// mountRoot returns a temporary directory for one test's sources and
// share, which must hold no mount when the test ends (mounttest.Root).
func mountRoot(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	return mounttest.Root(t)
}

// testShare creates the share root/share, removed when the test ends.
func testShare(t *testing.T, root string) *share.Share {
	t.Helper()
	sh, err := share.Create(filepath.Join(root, "share"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := share.Remove(sh.Dir()); err != nil {
			t.Errorf("remove the share: %v", err)
		}
	})
	return sh
}

// mountTmpfs mounts a tmpfs holding the file name at dir, unmounted when
// the test ends.
func mountTmpfs(t *testing.T, dir, name string) {
	t.Helper()
	mounttest.Tmpfs(t, dir)
	writeFile(t, filepath.Join(dir, name), name)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Only bind mounts are shared, each at c/<id>/m<index> with the index of
// its spec entry; an rbind's submounts are shared each on its own (at
// m<index>.<k>, for the guest to bind at their place) and a bind's are not;
// ro is read-only on the host side too (the submounts too only with rro),
// and the last of ro and rw wins.
func TestShareContainerSharesTheBindMounts(t *testing.T) {
	root := mountRoot(t)
	rootfs, data, vol := filepath.Join(root, "rootfs"), filepath.Join(root, "data"), filepath.Join(root, "vol")
	hosts, conf := filepath.Join(root, "hosts"), filepath.Join(root, "conf")
	writeFile(t, filepath.Join(rootfs, "etc/os-release"), "box")
	writeFile(t, filepath.Join(data, "a"), "a")
	writeFile(t, filepath.Join(vol, "v"), "v")
	writeFile(t, hosts, "127.0.0.1 box\n")
	writeFile(t, filepath.Join(conf, "c"), "c")
	mountTmpfs(t, filepath.Join(data, "sub"), "datasub")
	mountTmpfs(t, filepath.Join(vol, "sub"), "volsub")
	sh := testShare(t, root)

	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=1777"}},
		{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"ro", "nosuid"}},
		{Destination: "/data", Type: "bind", Source: data},
		{Destination: "/vol", Type: "none", Source: vol, Options: []string{"rbind", "ro"}},
		{Destination: "/etc/hosts", Type: "bind", Source: hosts, Options: []string{"ro", "rw"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts"},
		{Destination: "/conf", Source: conf, Options: []string{"bind", "ro"}},
		{Destination: "/rro", Type: "bind", Source: vol, Options: []string{"rbind", "rro"}},
	}}
	got, err := shareContainer(sh, shareDir("box1"), rootfs, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.rootfs != "c/box1/rootfs" {
		t.Errorf("rootfs at %q, want c/box1/rootfs", got.rootfs)
	}
	want := []*api.SharedMount{
		{Index: 3, Path: "c/box1/m3"},
		{Index: 4, Path: "c/box1/m4", Submounts: []*api.Submount{{Subpath: "sub", Path: "c/box1/m4.0"}}},
		{Index: 5, Path: "c/box1/m5"},
		{Index: 7, Path: "c/box1/m7"},
		{Index: 8, Path: "c/box1/m8", Submounts: []*api.Submount{{Subpath: "sub", Path: "c/box1/m8.0", ReadOnly: true}}},
	}
	if !slices.EqualFunc(got.mounts, want, func(a, b *api.SharedMount) bool { return proto.Equal(a, b) }) {
		t.Errorf("shared mounts = %v, want %v", got.mounts, want)
	}

	in := func(p string) string { return filepath.Join(sh.Dir(), p) }
	for path, content := range map[string]string{
		"c/box1/rootfs/etc/os-release": "box",
		"c/box1/m3/a":                  "a",
		"c/box1/m4/v":                  "v",
		"c/box1/m4.0/volsub":           "volsub", // rbind: the submount is shared on its own
		"c/box1/m5":                    "127.0.0.1 box\n",
		"c/box1/m7/c":                  "c",
	} {
		if b, err := os.ReadFile(in(path)); err != nil || string(b) != content {
			t.Errorf("%s in the share = %q, %v; want %q", path, b, err, content)
		}
	}
	// bind, not rbind: the submount is not.
	if _, err := os.Stat(in("c/box1/m3/sub/datasub")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a plain bind reached the source's submount: %v", err)
	}
	for path, ro := range map[string]bool{
		"c/box1/m3/new":   false,
		"c/box1/m4/new":   true,
		"c/box1/m4.0/new": false, // ro, not rro: as with runc
		"c/box1/m7/new":   true,
		"c/box1/m8/new":   true,
		"c/box1/m8.0/new": true, // rro: read-only recursively
	} {
		err := os.WriteFile(in(path), []byte("x"), 0o644)
		if ro && !errors.Is(err, unix.EROFS) {
			t.Errorf("write %s: %v, want EROFS", path, err)
		}
		if !ro && err != nil {
			t.Errorf("write %s: %v", path, err)
		}
	}
	// ro then rw: writable, and the write reaches the source.
	if err := os.WriteFile(in("c/box1/m5"), []byte("10.0.0.1 box\n"), 0o644); err != nil {
		t.Errorf("write through the ro,rw bind: %v", err)
	}
	if b, _ := os.ReadFile(hosts); string(b) != "10.0.0.1 box\n" {
		t.Errorf("source after a write through the share = %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(data, "new")); string(b) != "x" {
		t.Errorf("a write through the rw bind did not reach the source: %q", b)
	}
	mps := mountpoints(t, sh.Dir())
	for path, ro := range map[string]bool{"c/box1/rootfs": false, "c/box1/m3": false, "c/box1/m4": true,
		"c/box1/m4.0": false, "c/box1/m5": false, "c/box1/m7": true, "c/box1/m8.0": true} {
		opts, ok := mps[in(path)]
		if !ok {
			t.Errorf("nothing mounted at %s", path)
			continue
		}
		if slices.Contains(opts, "ro") != ro {
			t.Errorf("%s mounted with %v, want read-only %v", path, opts, ro)
		}
	}
	// No source's directory is a mount point in the share: the host can
	// remove its submounts' directories while the box runs.
	for _, p := range []string{"c/box1/m3/sub", "c/box1/m4/sub", "c/box1/m8/sub"} {
		if _, ok := mps[in(p)]; ok {
			t.Errorf("%s is a mount point in the share", p)
		}
	}
}

// A bind mount the share refuses fails with an error naming the mount's
// destination, with the share's class.
func TestShareContainerNamesTheMountThatFailed(t *testing.T) {
	root := mountRoot(t)
	rootfs := filepath.Join(root, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		source string
		is     error
		want   string
	}{
		{name: "missing source", source: filepath.Join(root, "missing"), is: errdefs.ErrNotFound,
			want: "mount /srv/data: bind source " + filepath.Join(root, "missing") + " does not exist"},
		{name: "source under /proc", source: "/proc/self", is: errdefs.ErrInvalidArgument,
			want: "mount /srv/data: bind source /proc/self is under the host's /proc"},
		{name: "relative source", source: "data", is: errdefs.ErrInvalidArgument, want: "mount /srv/data: bind source \"data\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sh := testShare(t, root)
			spec := &specs.Spec{Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Source: "proc"},
				{Destination: "/srv/data", Type: "bind", Source: tc.source, Options: []string{"rbind"}},
			}}
			_, err := shareContainer(sh, shareDir("box1"), rootfs, spec, nil)
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("shareContainer() = %v; want %v containing %q", err, tc.is, tc.want)
			}
		})
	}
	t.Run("missing rootfs", func(t *testing.T) {
		sh := testShare(t, root)
		_, err := shareContainer(sh, shareDir("box1"), filepath.Join(root, "norootfs"), &specs.Spec{}, nil)
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "share rootfs: ") {
			t.Fatalf("shareContainer() = %v; want not found naming the rootfs", err)
		}
	})
}

// While a box runs, the host can unmount a submount of a volume's source
// and remove its directory, as it can while a runc container runs (critest's
// read-only mount specs clean up that way). Verified two-sided: with the
// volume bound recursively into the share, the submount's directory was a
// mount point in the host's mount namespace and rmdir failed with EBUSY.
func TestTheHostCanRemoveASubmountOfASharedVolume(t *testing.T) {
	root := mountRoot(t)
	rootfs, vol := filepath.Join(root, "rootfs"), filepath.Join(root, "vol")
	writeFile(t, filepath.Join(rootfs, "etc/os-release"), "box")
	sub := filepath.Join(vol, "tmpfs")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	sh := testShare(t, root)
	spec := &specs.Spec{Mounts: []specs.Mount{{Destination: "/mnt", Type: "bind", Source: vol, Options: []string{"rbind", "ro"}}}}
	if _, err := shareContainer(sh, shareDir("box1"), rootfs, spec, nil); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(sub, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(sub); err != nil {
		t.Fatalf("remove the unmounted submount's directory while the volume is shared: %v", err)
	}
}
