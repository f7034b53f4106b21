package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/internal/mounttest"
	"github.com/boxlite/boxlite/pkg/reaper"
)

func TestMain(m *testing.M) {
	// Children (the registry, scripts) are started through the reaper,
	// the one owner of wait in a boxlite process.
	reaper.Default()
	os.Exit(m.Run())
}

// requireRoot skips a test that mounts overlays, writes trusted xattrs or
// makes whiteout devices.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root (overlay mounts, trusted.* xattrs, whiteout devices): run go test as root")
	}
}

// env is one test's world: a store in a directory that must hold no mount
// when the test ends, and a place for box directories.
type env struct {
	// root holds everything of the test (a mounttest.Root).
	root string
	// store is the store under root/images.
	store *Store
}

// newEnv checks for leaks (call it first) and opens a store.
func newEnv(t *testing.T, opts ...Opt) *env {
	t.Helper()
	requireRoot(t)
	leakcheck.Children(t)
	leakcheck.Goroutines(t)
	root := mounttest.Root(t)
	s, err := Open(filepath.Join(root, "images"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	// Counted from here: containerd v2.4.2's local content store leaves
	// the descriptor of its fsverity probe to a finalizer (fixed upstream,
	// containerd#13510), so Open "leaks" one until a GC.
	leakcheck.FDs(t)
	return &env{root: root, store: s}
}

// boxDir makes and returns a directory for box id.
func (e *env) boxDir(t *testing.T, id string) string {
	t.Helper()
	dir := filepath.Join(e.root, "boxes", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// mount mounts ref for box id at <box dir>/rootfs and unmounts it when the
// test ends (a no-op if the test did).
func (e *env) mount(t *testing.T, ref, id string) (Image, string) {
	t.Helper()
	dir := e.boxDir(t, id)
	target := filepath.Join(dir, "rootfs")
	img, err := e.store.Mount(context.Background(), ref, id, dir, target)
	if err != nil {
		t.Fatalf("Mount(%s, %s): %v", ref, id, err)
	}
	t.Cleanup(func() {
		if err := e.store.Unmount(id, target); err != nil {
			t.Errorf("Unmount(%s): %v", id, err)
		}
	})
	return img, target
}

// listFiles lists the regular files, symlinks and devices under dir (relative
// paths), for checks that nothing half-written is left.
func listFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(dir, path)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// assertClean fails unless the store holds nothing but its lock files and
// index, no blob, no ingest, no layer: nothing half-written.
func (e *env) assertClean(t *testing.T) {
	t.Helper()
	var left []string
	for _, f := range listFiles(t, e.store.root) {
		if !strings.HasSuffix(f, ".lock") && f != "index.json" {
			left = append(left, f)
		}
	}
	if len(left) > 0 {
		t.Errorf("left in the store: %v", left)
	}
	if imgs, err := e.store.List(); err != nil || len(imgs) > 0 {
		t.Errorf("List() = %v, %v; want no image", imgs, err)
	}
}

// entry is one file of a test layer.
type entry struct {
	// name is the path in the tarball (a trailing / makes a directory).
	name string
	// body is a regular file's content.
	body string
}

// layerTar returns an uncompressed layer tarball of entries.
func layerTar(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Mode: 0o644, Typeflag: tar.TypeReg, Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0)}
		if strings.HasSuffix(e.name, "/") {
			hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeDir, 0o755, 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipped(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// testImage is an image built by a test.
type testImage struct {
	// manifest describes the manifest.
	manifest ocispec.Descriptor
	// config describes the config.
	config ocispec.Descriptor
	// layers describe the gzipped layers.
	layers []ocispec.Descriptor
	// tars are the uncompressed layers.
	tars [][]byte
	// blobs are every blob by digest.
	blobs map[digest.Digest][]byte
}

// baseLayer and topLayer make the test image: the top layer deletes /a
// (a whiteout) and makes /d opaque, hiding /d/x.
func baseLayer(t *testing.T) []byte {
	return layerTar(t, entry{name: "a", body: "a from the base layer"}, entry{name: "d/"}, entry{name: "d/x", body: "x"},
		entry{name: "etc/"}, entry{name: "etc/hello", body: "hello from the base layer\n"}, entry{name: "srv/"})
}

func topLayer(t *testing.T) []byte {
	return layerTar(t, entry{name: ".wh.a"}, entry{name: "d/"}, entry{name: "d/.wh..wh..opq"}, entry{name: "d/y", body: "y"},
		entry{name: "etc/"}, entry{name: "etc/top", body: "top"})
}

// appConfig is the test image's config.
var appConfig = ocispec.ImageConfig{
	Entrypoint: []string{"/bin/app"},
	Cmd:        []string{"--serve"},
	Env:        []string{"PATH=/bin", "GREETING=hi"},
	WorkingDir: "/srv",
	User:       "1000:1000",
}

// buildImage builds a linux/amd64 image of cfg and the layer tarballs.
func buildImage(t *testing.T, cfg ocispec.ImageConfig, tars ...[]byte) testImage {
	t.Helper()
	return buildImageConfig(t, cfg, nil, tars...)
}

// buildImageConfig is buildImage with edit, if not nil, applied to the
// image's config before it is written.
func buildImageConfig(t *testing.T, cfg ocispec.ImageConfig, edit func(*ocispec.Image), tars ...[]byte) testImage {
	t.Helper()
	img := testImage{blobs: map[digest.Digest][]byte{}, tars: tars}
	add := func(mediaType string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
		img.blobs[d.Digest] = b
		return d
	}
	created := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	config := ocispec.Image{Created: &created, Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, Config: cfg, RootFS: ocispec.RootFS{Type: "layers"}}
	for _, tb := range tars {
		config.RootFS.DiffIDs = append(config.RootFS.DiffIDs, digest.FromBytes(tb))
		img.layers = append(img.layers, add(ocispec.MediaTypeImageLayerGzip, gzipped(t, tb)))
	}
	if edit != nil {
		edit(&config)
	}
	img.config = add(ocispec.MediaTypeImageConfig, mustJSON(t, config))
	manifest := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: img.config, Layers: img.layers}
	img.manifest = add(ocispec.MediaTypeImageManifest, mustJSON(t, manifest))
	return img
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ociArchive returns an OCI image-layout tarball of img named name.
func ociArchive(t *testing.T, img testImage, name string) []byte {
	t.Helper()
	desc := img.manifest
	desc.Annotations = map[string]string{"io.containerd.image.name": name, ocispec.AnnotationRefName: "v1"}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{desc}}
	files := map[string][]byte{
		ocispec.ImageLayoutFile: mustJSON(t, ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion}),
		ocispec.ImageIndexFile:  mustJSON(t, idx),
	}
	for d, b := range img.blobs {
		files["blobs/sha256/"+d.Encoded()] = b
	}
	return tarOf(t, files)
}

// dockerArchive returns a docker save tarball of img tagged tag, with
// uncompressed layers.
func dockerArchive(t *testing.T, img testImage, tag string) []byte {
	t.Helper()
	files := map[string][]byte{"config.json": img.blobs[img.config.Digest]}
	var layers []string
	for i, tb := range img.tars {
		name := fmt.Sprintf("layer%d/layer.tar", i)
		files[name] = tb
		layers = append(layers, name)
	}
	files["manifest.json"] = mustJSON(t, []map[string]any{{"Config": "config.json", "RepoTags": []string{tag}, "Layers": layers}})
	return tarOf(t, files)
}

// tarOf returns a tarball of files, in name order.
func tarOf(t *testing.T, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(files[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
