package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/reaper"
)

func TestLoadNamesImagesOfBothTarballFormats(t *testing.T) {
	tests := []struct {
		name    string
		archive func(*testing.T, testImage) []byte
		want    string
	}{
		{"OCI layout", func(t *testing.T, img testImage) []byte {
			return ociArchive(t, img, "example.com/test/oci:v1")
		}, "example.com/test/oci:v1"},
		{"docker save", func(t *testing.T, img testImage) []byte {
			return dockerArchive(t, img, "test/saved:v1")
		}, "docker.io/test/saved:v1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			img := buildImage(t, appConfig, baseLayer(t), topLayer(t))
			loaded, err := e.store.Load(context.Background(), bytes.NewReader(tt.archive(t, img)))
			if err != nil {
				t.Fatal(err)
			}
			if len(loaded) != 1 || loaded[0].Name != tt.want || len(loaded[0].Layers) != 2 {
				t.Fatalf("Load = %+v; want one image %s with 2 layers", loaded, tt.want)
			}
			if !slices.Equal(loaded[0].Config.Env, appConfig.Env) {
				t.Errorf("config env %v, want %v", loaded[0].Config.Env, appConfig.Env)
			}
			_, target := e.mount(t, tt.want, "box-1")
			if b, err := os.ReadFile(filepath.Join(target, "etc/hello")); err != nil || string(b) != "hello from the base layer\n" {
				t.Errorf("etc/hello = %q, %v", b, err)
			}
		})
	}
}

func TestLoadBusyboxImageOfScripts(t *testing.T) {
	e := newEnv(t)
	path := ociImageTarball(t)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	loaded, err := e.store.Load(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, img := range loaded {
		names = append(names, img.Name)
	}
	slices.Sort(names)
	if want := []string{"docker.io/boxlite/busybox:test", "docker.io/boxlite/nocmd:test"}; !slices.Equal(names, want) {
		t.Fatalf("Load names %v, want %v", names, want)
	}
	img, target := e.mount(t, "boxlite/busybox:test", "box-1")
	if fi, err := os.Stat(filepath.Join(target, "bin/busybox")); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("bin/busybox in the rootfs: %v, %v", fi, err)
	}
	if p, err := img.Process(Process{}); err != nil || !slices.Equal(p.Args, []string{"sh"}) {
		t.Errorf("busybox Process = %+v, %v; want sh", p, err)
	}
	nocmd, err := e.store.Get("boxlite/nocmd:test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nocmd.Process(Process{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("nocmd Process = %v; want an invalid-argument error", err)
	}
}

// ociImageTarball returns the busybox OCI tarball scripts/oci-image.sh
// builds or finds in its cache, or skips the test.
func ociImageTarball(t *testing.T) string {
	t.Helper()
	script, err := filepath.Abs("../../scripts/oci-image.sh")
	if err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	cmd := exec.Command("bash", script, "--print-path")
	cmd.Stdout, cmd.Stderr = &out, &errb
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), poll.Timeout*10)
	defer cancel()
	exit, err := p.Wait(ctx)
	if err != nil {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		t.Fatalf("scripts/oci-image.sh: %v", err)
	}
	lines := strings.Fields(out.String())
	if exit.Status != 0 || len(lines) == 0 {
		t.Skipf("no busybox OCI tarball (scripts/oci-image.sh: %v: %s): run make setup (busybox-static)", exit, errb.String())
	}
	return lines[len(lines)-1]
}

func TestLoadBadTarballIsClearAndLeavesNothing(t *testing.T) {
	e := newEnv(t)
	img := buildImage(t, appConfig, baseLayer(t), topLayer(t))
	good := ociArchive(t, img, "example.com/test/oci:v1")
	missingLayer := buildImage(t, appConfig, baseLayer(t), topLayer(t))
	delete(missingLayer.blobs, missingLayer.layers[1].Digest)
	unnamed := ociArchive(t, img, "")

	tests := []struct {
		name    string
		archive []byte
		says    string
	}{
		{"not a tarball", []byte("this is not a tarball at all, not even close........"), "load image archive"},
		{"truncated", good[:len(good)*2/3], "load image archive"},
		{"no layout, no manifest.json", tarOf(t, map[string][]byte{"hello": []byte("hi")}), "unrecognized image format"},
		{"missing layer", ociArchive(t, missingLayer, "example.com/test/broken:v1"), missingLayer.layers[1].Digest.String()},
		{"no name", unnamed, "names no image"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.store.Load(context.Background(), bytes.NewReader(tt.archive))
			if err == nil || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("Load = %v; want an error saying %q", err, tt.says)
			}
			e.assertClean(t)
		})
	}
}

// The OCI ref name annotation alone names an image only if it is a full
// reference: a bare tag has no repository.
func TestArchiveNameNeedsAFullReference(t *testing.T) {
	tests := []struct {
		annotations map[string]string
		want        string
	}{
		{map[string]string{"io.containerd.image.name": "docker.io/a/b:c", ocispec.AnnotationRefName: "c"}, "docker.io/a/b:c"},
		{map[string]string{ocispec.AnnotationRefName: "example.com/a:1"}, "example.com/a:1"},
		{map[string]string{ocispec.AnnotationRefName: "latest"}, ""},
		{nil, ""},
	}
	for _, tt := range tests {
		if got := archiveName(tt.annotations); got != tt.want {
			t.Errorf("archiveName(%v) = %q, want %q", tt.annotations, got, tt.want)
		}
	}
}
