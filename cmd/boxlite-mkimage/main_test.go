package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// needBusybox skips unless a static busybox is installed.
func needBusybox(t *testing.T) {
	t.Helper()
	if err := checkStatic("/bin/busybox"); err != nil {
		t.Skipf("needs Debian's busybox-static (run make setup): %v", err)
	}
}

// readTar returns the regular files of a tar stream by name, and the other
// entries' headers.
func readTar(t *testing.T, r io.Reader) (map[string][]byte, map[string]*tar.Header) {
	t.Helper()
	files, headers := map[string][]byte{}, map[string]*tar.Header{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files, headers
		}
		if err != nil {
			t.Fatal(err)
		}
		headers[h.Name] = h
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = data
		}
	}
}

func build(t *testing.T, args ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "img.tar")
	if err := run(append([]string{"-o", out}, args...)); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestOutputIsReproducible(t *testing.T) {
	needBusybox(t)
	args := []string{"-image", `docker.io/boxlite/busybox:test=["sh"]`, "-image", "docker.io/boxlite/nocmd:test="}
	a, b := build(t, args...), build(t, args...)
	if !bytes.Equal(a, b) {
		t.Fatalf("two builds differ: %x vs %x", sha256.Sum256(a), sha256.Sum256(b))
	}
}

func TestLayoutNamesEachImageAndSharesTheLayer(t *testing.T) {
	needBusybox(t)
	files, _ := readTar(t, bytes.NewReader(build(t,
		"-image", `docker.io/boxlite/busybox:test=["sh"]`, "-image", "docker.io/boxlite/nocmd:test=")))
	if string(files[ocispec.ImageLayoutFile]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout: %q", files[ocispec.ImageLayoutFile])
	}
	blob := func(d fmt.Stringer) []byte {
		data, ok := files["blobs/sha256/"+strings.TrimPrefix(d.String(), "sha256:")]
		if !ok {
			t.Fatalf("blob %s missing", d)
		}
		if got := fmt.Sprintf("sha256:%x", sha256.Sum256(data)); got != d.String() {
			t.Fatalf("blob %s has digest %s", d, got)
		}
		return data
	}
	var index ocispec.Index
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{"docker.io/boxlite/busybox:test": {"sh"}, "docker.io/boxlite/nocmd:test": nil}
	if len(index.Manifests) != len(want) {
		t.Fatalf("index has %d manifests, want %d", len(index.Manifests), len(want))
	}
	var layers []string
	for _, desc := range index.Manifests {
		name := desc.Annotations[refNameAnnotation]
		cmd, ok := want[name]
		if !ok || desc.Annotations[ocispec.AnnotationRefName] != "test" {
			t.Errorf("unexpected manifest annotations %v", desc.Annotations)
			continue
		}
		if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != "amd64" {
			t.Errorf("%s: platform %+v", name, desc.Platform)
		}
		var m ocispec.Manifest
		if err := json.Unmarshal(blob(desc.Digest), &m); err != nil {
			t.Fatal(err)
		}
		var cfg ocispec.Image
		if err := json.Unmarshal(blob(m.Config.Digest), &cfg); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(cfg.Config.Cmd) != fmt.Sprint(cmd) || len(cfg.Config.Env) != 1 || !strings.HasPrefix(cfg.Config.Env[0], "PATH=") {
			t.Errorf("%s: config %+v", name, cfg.Config)
		}
		if len(m.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 {
			t.Fatalf("%s: %d layers, %d diff ids", name, len(m.Layers), len(cfg.RootFS.DiffIDs))
		}
		gz := blob(m.Layers[0].Digest)
		zr, err := gzip.NewReader(bytes.NewReader(gz))
		if err != nil {
			t.Fatal(err)
		}
		raw, err := io.ReadAll(zr)
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprintf("sha256:%x", sha256.Sum256(raw)); got != cfg.RootFS.DiffIDs[0].String() {
			t.Errorf("%s: diff id %s, uncompressed layer is %s", name, cfg.RootFS.DiffIDs[0], got)
		}
		layers = append(layers, m.Layers[0].Digest.String())
	}
	if len(layers) == 2 && layers[0] != layers[1] {
		t.Errorf("images do not share their layer: %v", layers)
	}
}

func TestLayerHoldsBusyboxAppletsAndUsers(t *testing.T) {
	needBusybox(t)
	l, err := busyboxLayer("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(l.gz))
	if err != nil {
		t.Fatal(err)
	}
	files, headers := readTar(t, zr)
	bb, _ := os.ReadFile("/bin/busybox")
	if !bytes.Equal(files["bin/busybox"], bb) || headers["bin/busybox"].Mode != 0o755 {
		t.Errorf("bin/busybox is not the host's static busybox with mode 0755")
	}
	for _, applet := range []string{"sh", "cat", "id", "sleep", "env"} {
		h := headers["bin/"+applet]
		if h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "busybox" {
			t.Errorf("bin/%s: %+v, want a symlink to busybox", applet, h)
		}
	}
	if !strings.Contains(string(files["etc/passwd"]), "root:x:0:0:") || !strings.Contains(string(files["etc/group"]), "root:x:0:") {
		t.Errorf("etc/passwd %q, etc/group %q", files["etc/passwd"], files["etc/group"])
	}
	if h := headers["tmp/"]; h == nil || h.Mode != 0o1777 {
		t.Errorf("tmp/: %+v, want mode 1777", h)
	}
}

func TestRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-image", `x:y=["sh"]`},                     // no -o
		{"-o", "x.tar"},                              // no image
		{"-o", "x.tar", "-image", "noequals"},        // no =
		{"-o", "x.tar", "-image", `x:y=sh`},          // cmd not JSON
		{"-o", "x.tar", "-image", `x:y=["sh"]`, "z"}, // stray argument
	} {
		if err := run(args); err == nil {
			t.Errorf("run(%q) succeeded", args)
		}
	}
}

func TestRefusesADynamicBusybox(t *testing.T) {
	if err := checkStatic("/bin/ls"); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("checkStatic(/bin/ls) = %v, want a dynamically linked error", err)
	}
}
