package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/mounttest"
)

// load loads img into the store as name.
func (e *env) load(t *testing.T, img testImage, name string) Image {
	t.Helper()
	loaded, err := e.store.Load(context.Background(), bytes.NewReader(ociArchive(t, img, name)))
	if err != nil {
		t.Fatal(err)
	}
	return loaded[0]
}

func TestMountAppliesWhiteoutsOfUpperLayers(t *testing.T) {
	e := newEnv(t)
	img := e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	_, target := e.mount(t, "example.com/app:v1", "box-1")

	for _, gone := range []string{"a", "d/x"} {
		if _, err := os.Lstat(filepath.Join(target, gone)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/%s in the rootfs: %v; want it deleted by the upper layer", gone, err)
		}
	}
	for _, kept := range []string{"d/y", "etc/hello", "etc/top", "srv"} {
		if _, err := os.Lstat(filepath.Join(target, kept)); err != nil {
			t.Errorf("/%s in the rootfs: %v", kept, err)
		}
	}
	// The top layer's directory holds overlay whiteouts, not .wh. files.
	top := e.store.layerDir(img.Layers[1])
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(top, "a"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("whiteout of /a in the top layer: mode %o rdev %d, %v; want a 0/0 char device", st.Mode, st.Rdev, err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Getxattr(filepath.Join(top, "d"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("trusted.overlay.opaque of /d in the top layer: %q, %v; want \"y\"", buf[:max(n, 0)], err)
	}
	if _, err := os.Lstat(filepath.Join(top, ".wh.a")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf(".wh.a unpacked as a file: %v", err)
	}
}

func TestMountsShareLayersAndKeepWritesApart(t *testing.T) {
	e := newEnv(t)
	e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	_, one := e.mount(t, "example.com/app:v1", "box-1")
	_, two := e.mount(t, "example.com/app:v1", "box-2")

	l1, l2 := lowerdirs(t, one), lowerdirs(t, two)
	if len(l1) != 2 || !slices.Equal(l1, l2) {
		t.Fatalf("lowerdirs %v and %v; want the same two layer directories", l1, l2)
	}
	ino := func(path string) uint64 {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	base := l1[1]
	if a, b, c := ino(filepath.Join(base, "etc/hello")), ino(filepath.Join(one, "etc/hello")), ino(filepath.Join(two, "etc/hello")); a != b || b != c {
		t.Errorf("inode of etc/hello: layer %d, box-1 %d, box-2 %d; want one file", a, b, c)
	}

	if err := os.WriteFile(filepath.Join(one, "etc/hello"), []byte("changed in box-1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(one, "new"), []byte("box-1 only"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(two, "etc/hello")); string(b) != "hello from the base layer\n" {
		t.Errorf("box-2 sees etc/hello = %q; want the image's", b)
	}
	if b, _ := os.ReadFile(filepath.Join(base, "etc/hello")); string(b) != "hello from the base layer\n" {
		t.Errorf("the layer's etc/hello = %q; a box wrote through to it", b)
	}
	if _, err := os.Stat(filepath.Join(two, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("box-2 sees box-1's new file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.root, "boxes/box-1/upper/new")); err != nil {
		t.Errorf("box-1's write is not in its upper directory: %v", err)
	}
}

// lowerdirs returns the lowerdir option of the overlay mounted at target.
func lowerdirs(t *testing.T, target string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 || fields[4] != target {
			continue
		}
		for _, opt := range strings.Split(fields[len(fields)-1], ",") {
			if v, ok := strings.CutPrefix(opt, "lowerdir="); ok {
				return strings.Split(v, ":")
			}
		}
	}
	t.Fatalf("no overlay with a lowerdir at %s", target)
	return nil
}

func TestRemoveOfAnImageInUseFailsNamingTheBox(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	dir := e.boxDir(t, "box-1")
	target := filepath.Join(dir, "rootfs")
	if _, err := e.store.Mount(ctx, "example.com/app:v1", "box-1", dir, target); err != nil {
		t.Fatal(err)
	}

	err := e.store.Remove(ctx, "example.com/app:v1")
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "box-1") {
		t.Fatalf("Remove of an image in use = %v; want a failed precondition naming box-1", err)
	}
	if err := e.store.Unmount("box-1", target); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Unmount("box-1", target); err != nil {
		t.Errorf("second Unmount = %v; want nil (idempotent)", err)
	}
	if err := e.store.Remove(ctx, "example.com/app:v1"); err != nil {
		t.Fatalf("Remove after Unmount = %v", err)
	}
	if _, err := e.store.Get("example.com/app:v1"); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "example.com/app:v1") {
		t.Errorf("Get after Remove = %v; want not found naming the image", err)
	}
	e.assertClean(t)
}

func TestLayersAreCollectedAfterTheLastImageUsingThemIsRemoved(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// Two images share the base layer.
	a := e.load(t, buildImage(t, appConfig, baseLayer(t)), "example.com/a:v1")
	b := e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/b:v1")
	if a.Layers[0] != b.Layers[0] {
		t.Fatalf("chain IDs of the shared base layer differ: %s, %s", a.Layers[0], b.Layers[0])
	}
	e.mount(t, "example.com/a:v1", "box-a")
	e.mount(t, "example.com/b:v1", "box-b")
	if err := e.store.Unmount("box-a", filepath.Join(e.root, "boxes/box-a/rootfs")); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Unmount("box-b", filepath.Join(e.root, "boxes/box-b/rootfs")); err != nil {
		t.Fatal(err)
	}
	layers := func() []string {
		entries, err := os.ReadDir(e.store.layersDir())
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, d := range entries {
			out = append(out, d.Name())
		}
		return out
	}
	if got := layers(); len(got) != 2 {
		t.Fatalf("layers %v; want the base and the top layer", got)
	}
	if err := e.store.Remove(ctx, "example.com/b:v1"); err != nil {
		t.Fatal(err)
	}
	if got := layers(); !slices.Equal(got, []string{a.Layers[0].Encoded()}) {
		t.Errorf("layers after removing b: %v; want only the shared base %s", got, a.Layers[0].Encoded())
	}
	if err := e.store.Remove(ctx, "example.com/a:v1"); err != nil {
		t.Fatal(err)
	}
	e.assertClean(t)
}

// A box keeps the layers it was made from when its image's name is
// removed, and they go once the box unmounts.
func TestBoxKeepsItsLayersWhenTheNameMovesOn(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t)), "example.com/app:v1")
	other := e.load(t, buildImage(t, appConfig, topLayer(t)), "example.com/other:v1")
	dir := e.boxDir(t, "box-1")
	target := filepath.Join(dir, "rootfs")
	img, err := e.store.Mount(ctx, "example.com/app:v1", "box-1", dir, target)
	if err != nil {
		t.Fatal(err)
	}
	// Another name for the same image: removing one name is an untag.
	if _, err := e.store.Load(ctx, bytes.NewReader(ociArchive(t, buildImage(t, appConfig, baseLayer(t)), "example.com/alias:v1"))); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Remove(ctx, "example.com/app:v1"); err != nil {
		t.Fatalf("Remove of one of two names = %v", err)
	}
	if err := e.store.Remove(ctx, "example.com/alias:v1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Remove of the last name of an image in use = %v; want a failed precondition", err)
	}
	if err := e.store.Remove(ctx, "example.com/other:v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.store.layerDir(img.Layers[0])); err != nil {
		t.Fatalf("the box's layer: %v", err)
	}
	if _, err := os.Stat(e.store.layerDir(other.Layers[0])); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the removed image's layer: %v; want it collected", err)
	}
	if err := e.store.Unmount("box-1", target); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Remove(ctx, "example.com/alias:v1"); err != nil {
		t.Fatal(err)
	}
	e.assertClean(t)
}

func TestUnmountOfABusyRootfsFailsAndKeepsTheRecord(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t)), "example.com/app:v1")
	_, target := e.mount(t, "example.com/app:v1", "box-1")
	f, err := os.Open(filepath.Join(target, "etc/hello"))
	if err != nil {
		t.Fatal(err)
	}
	err = e.store.Unmount("box-1", target)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "busy") {
		t.Errorf("Unmount of a busy rootfs = %v; want a failed precondition saying busy", err)
	}
	if len(mounttest.Under(t, target)) != 1 {
		t.Errorf("busy rootfs not mounted any more: lazy unmount?")
	}
	if err := e.store.Remove(ctx, "example.com/app:v1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Remove after a failed Unmount = %v; want the box still recorded", err)
	}
	f.Close()
	if err := e.store.Unmount("box-1", target); err != nil {
		t.Errorf("Unmount once not busy = %v", err)
	}
}

func TestMountFailuresLeaveNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	// An image whose config lies about a layer's uncompressed digest.
	lie := func(c *ocispec.Image) { c.RootFS.DiffIDs[1] = digest.FromString("not the layer") }
	e.load(t, buildImageConfig(t, appConfig, lie, baseLayer(t), layerTar(t, entry{name: "bad", body: "bad"})), "example.com/bad:v1")

	tests := []struct {
		name   string
		ref    string
		target func(dir string) string
		class  error
	}{
		{"unknown image", "example.com/nothing:v1", func(dir string) string { return filepath.Join(dir, "rootfs") }, errdefs.ErrNotFound},
		{"corrupt layer", "example.com/bad:v1", func(dir string) string { return filepath.Join(dir, "rootfs") }, errdefs.ErrDataLoss},
		{"target cannot be made", "example.com/app:v1", func(dir string) string { return filepath.Join(dir, "no/such/rootfs") }, os.ErrNotExist},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := fmt.Sprintf("box-%d", i)
			dir := e.boxDir(t, id)
			_, err := e.store.Mount(ctx, tt.ref, id, dir, tt.target(dir))
			if !errors.Is(err, tt.class) {
				t.Fatalf("Mount = %v; want %v", err, tt.class)
			}
			if left := listDir(t, dir); len(left) > 0 {
				t.Errorf("left in the box directory: %v", left)
			}
			if left := mounttest.Under(t, e.root); len(left) > 0 {
				t.Errorf("left mounted: %v", left)
			}
			idx, err := e.store.readIndex()
			if err != nil || len(idx.Boxes) > 0 {
				t.Errorf("boxes recorded: %v, %v", idx.Boxes, err)
			}
			for _, l := range listDir(t, e.store.layersDir()) {
				if strings.HasPrefix(l, tmpPrefix) {
					t.Errorf("half-unpacked layer left: %s", l)
				}
			}
		})
	}
}

func TestConcurrentMountsUnpackEachLayerOnce(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	const n = 6
	var wg sync.WaitGroup
	errs := make([]error, n)
	targets := make([]string, n)
	for i := range n {
		id := fmt.Sprintf("box-%d", i)
		dir := e.boxDir(t, id)
		targets[i] = filepath.Join(dir, "rootfs")
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.store.Mount(ctx, "example.com/app:v1", id, dir, targets[i])
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Mount %d: %v", i, err)
		}
	}
	if l := listDir(t, e.store.layersDir()); len(l) != 2 {
		t.Errorf("layers %v; want two, no temporary directory", l)
	}
	for i := range n {
		if b, err := os.ReadFile(filepath.Join(targets[i], "etc/top")); err != nil || string(b) != "top" {
			t.Errorf("box-%d etc/top = %q, %v", i, b, err)
		}
		if err := e.store.Unmount(fmt.Sprintf("box-%d", i), targets[i]); err != nil {
			t.Errorf("Unmount %d: %v", i, err)
		}
	}
}

// After a host restart the mount is gone but the record is not: Mount
// again mounts the same layers over the box's upper directory.
func TestMountAgainAfterARestartKeepsTheBoxWrites(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.load(t, buildImage(t, appConfig, baseLayer(t)), "example.com/app:v1")
	_, target := e.mount(t, "example.com/app:v1", "box-1")
	if err := os.WriteFile(filepath.Join(target, "kept"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(target, 0); err != nil { // the restart
		t.Fatal(err)
	}
	dir := filepath.Dir(target)
	if _, err := e.store.Mount(ctx, "example.com/app:v1", "box-1", dir, target); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "kept")); err != nil || string(b) != "kept" {
		t.Errorf("the box's write after mounting again: %q, %v", b, err)
	}
	if _, err := e.store.Mount(ctx, "example.com/app:v1", "box-1", dir, target); err != nil {
		t.Errorf("Mount of a mounted box = %v; want nil", err)
	}
	if n := len(mounttest.Under(t, target)); n != 1 {
		t.Errorf("%d mounts at the target; want 1", n)
	}
	if _, err := e.store.Mount(ctx, "example.com/app:v1", "box-1", dir, filepath.Join(dir, "elsewhere")); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Mount of the box at another target = %v; want already exists", err)
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range entries {
		out = append(out, d.Name())
	}
	return out
}

// With many layers the lowerdir option outgrows a page; containerd's mount
// shortens it (relative paths from the layers directory).
func TestMountOfManyLayers(t *testing.T) {
	e := newEnv(t)
	const n = 45
	var tars [][]byte
	for i := range n {
		tars = append(tars, layerTar(t, entry{name: fmt.Sprintf("f%02d", i), body: fmt.Sprint(i)}))
	}
	img := e.load(t, buildImage(t, appConfig, tars...), "example.com/many:v1")
	var dirs []string
	for _, l := range img.Layers {
		dirs = append(dirs, e.store.layerDir(l))
	}
	if len(strings.Join(dirs, ":")) < os.Getpagesize() {
		t.Fatalf("%d layers fit in a page: the test needs more", n)
	}
	_, target := e.mount(t, "example.com/many:v1", "box-1")
	for _, i := range []int{0, n / 2, n - 1} {
		if b, err := os.ReadFile(filepath.Join(target, fmt.Sprintf("f%02d", i))); err != nil || string(b) != fmt.Sprint(i) {
			t.Errorf("f%02d = %q, %v", i, b, err)
		}
	}
}

// Two stores on one root stand for two processes: each takes the store's
// file locks through its own descriptors.
func TestTwoStoresOnOneRootShareItSafely(t *testing.T) {
	e := newEnv(t)
	other, err := Open(e.store.root)
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC() // closes the descriptor containerd's fsverity probe left open
	ctx := context.Background()
	archive := ociArchive(t, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "example.com/app:v1")
	stores := []*Store{e.store, other}
	var wg sync.WaitGroup
	errs := make([]error, len(stores))
	targets := make([]string, len(stores))
	for i, s := range stores {
		id := fmt.Sprintf("box-%d", i)
		dir := e.boxDir(t, id)
		targets[i] = filepath.Join(dir, "rootfs")
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Load(ctx, bytes.NewReader(archive)); err != nil {
				errs[i] = err
				return
			}
			_, errs[i] = s.Mount(ctx, "example.com/app:v1", id, dir, targets[i])
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, s := range stores {
		if b, err := os.ReadFile(filepath.Join(targets[i], "etc/top")); err != nil || string(b) != "top" {
			t.Errorf("box-%d etc/top = %q, %v", i, b, err)
		}
		if err := s.Unmount(fmt.Sprintf("box-%d", i), targets[i]); err != nil {
			t.Error(err)
		}
	}
	if err := other.Remove(ctx, "example.com/app:v1"); err != nil {
		t.Fatal(err)
	}
	e.assertClean(t)
}
