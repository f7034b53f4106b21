package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// dynamicBusybox returns Debian's dynamic busybox as scripts/critest-images.sh
// caches it, or skips.
func dynamicBusybox(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("BOXLITE_CACHE")
	if cache == "" {
		cache = "/var/cache/boxlite"
	}
	p := filepath.Join(cache, "critest", "busybox", "busybox")
	if _, err := os.Stat(p); err != nil {
		t.Skipf("needs Debian's dynamic busybox at %s: run scripts/critest-images.sh once", p)
	}
	return p
}

// buildStandin builds cmd/boxlite-standin, static, into a temporary
// directory.
func buildStandin(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "boxlite-standin")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if p, err := exec.LookPath("go"); err == nil {
		gobin = p
	}
	cmd := exec.Command(gobin, "build", "-o", out, "../boxlite-standin")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if logs, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build boxlite-standin: %v\n%s", err, logs)
	}
	return out
}

// critestLayout is a written -critest layout: its index entries by name
// and its blobs by digest.
type critestLayout struct {
	byName map[string]ocispec.Descriptor
	files  map[string][]byte
}

func (l critestLayout) blob(t *testing.T, d string) []byte {
	t.Helper()
	data, ok := l.files["blobs/sha256/"+strings.TrimPrefix(d, "sha256:")]
	if !ok {
		t.Fatalf("blob %s missing", d)
	}
	return data
}

// image returns the manifest and config of the image named name.
func (l critestLayout) image(t *testing.T, name string) (ocispec.Manifest, ocispec.Image) {
	t.Helper()
	desc, ok := l.byName[name]
	if !ok {
		t.Fatalf("no image %s", name)
	}
	var m ocispec.Manifest
	var cfg ocispec.Image
	if err := json.Unmarshal(l.blob(t, desc.Digest.String()), &m); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(l.blob(t, m.Config.Digest.String()), &cfg); err != nil {
		t.Fatal(err)
	}
	return m, cfg
}

// entries returns the tar headers of every layer of the image, by path.
func (l critestLayout) entries(t *testing.T, name string) map[string]*tar.Header {
	t.Helper()
	m, _ := l.image(t, name)
	out := map[string]*tar.Header{}
	for _, ld := range m.Layers {
		zr, err := gzip.NewReader(bytes.NewReader(l.blob(t, ld.Digest.String())))
		if err != nil {
			t.Fatal(err)
		}
		_, headers := readTar(t, zr)
		for p, h := range headers {
			out[p] = h
		}
	}
	return out
}

func buildCritest(t *testing.T) critestLayout {
	t.Helper()
	data := build(t, "-critest", "-busybox", dynamicBusybox(t), "-standin", buildStandin(t))
	files, _ := readTar(t, bytes.NewReader(data))
	var index ocispec.Index
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	l := critestLayout{byName: map[string]ocispec.Descriptor{}, files: files}
	for _, d := range index.Manifests {
		l.byName[d.Annotations[refNameAnnotation]] = d
	}
	return l
}

// TestCritestImages builds the critest images once and checks them.
func TestCritestImages(t *testing.T) {
	l := buildCritest(t)
	t.Run("HaveTheNamesAndIdentitiesTheSuiteExpects", func(t *testing.T) { checkCritestIdentities(t, l) })
	t.Run("BusyboxAppletsAreHardLinksWithTheBinarysMode", func(t *testing.T) { checkCritestFiles(t, l) })
}

func checkCritestIdentities(t *testing.T, l critestLayout) {
	digestOf := func(name string) string {
		d, ok := l.byName[name]
		if !ok {
			t.Fatalf("no image %s", name)
		}
		return d.Digest.String()
	}
	same := [][]string{
		{"registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"},
		{criRegistry + "test-image-tags:1", criRegistry + "test-image-tags:2", criRegistry + "test-image-tags:3"},
	}
	for _, names := range same {
		for _, n := range names[1:] {
			if digestOf(n) != digestOf(names[0]) {
				t.Errorf("%s and %s are different images, want one", names[0], n)
			}
		}
	}
	distinct := []string{
		sandboxImage, "registry.k8s.io/pause:3.9", criRegistry + "test-image-1:latest", criRegistry + "test-image-2:latest",
		criRegistry + "test-image-3:latest", criRegistry + "test-image-latest:latest", criRegistry + "test-image-tag:test",
		criRegistry + "test-image-tag:all", e2eRegistry + "busybox:1.29-2",
	}
	seen := map[string]string{}
	for _, n := range distinct {
		if other, ok := seen[digestOf(n)]; ok {
			t.Errorf("%s and %s are the same image, want distinct ones", n, other)
		}
		seen[digestOf(n)] = n
	}
	users := map[string]string{
		sandboxImage: "65535:65535", criRegistry + "test-image-user-uid:latest": "1002",
		criRegistry + "test-image-user-username:latest": "www-data", criRegistry + "test-image-user-uid-group:latest": "1003:1004",
		criRegistry + "test-image-user-username-group:latest": "www-data:1004", criRegistry + "test-image-predefined-group:latest": "1000",
	}
	for name, user := range users {
		if _, cfg := l.image(t, name); cfg.Config.User != user {
			t.Errorf("%s: user %q, want %q", name, cfg.Config.User, user)
		}
	}
}

// checkCritestFiles checks the files specs depend on. Verified two-sided:
// with link entries written with mode 0 (as at first), containerd unpacked
// busybox and pause as mode 0000 and every pod failed with "exec: /pause:
// permission denied"; the check fails then and passes now.
func checkCritestFiles(t *testing.T, l critestLayout) {
	e := l.entries(t, e2eRegistry+"busybox:1.29-2")
	for _, p := range []string{"bin/ls", "bin/sh", "bin/top", "bin/pidof"} {
		h := e[p]
		// Unpacking applies a link entry's mode to the linked file.
		if h == nil || h.Typeflag != tar.TypeLink || h.Linkname != "bin/busybox" || h.Mode != 0o755 {
			t.Errorf("%s: %+v, want a hard link to bin/busybox with mode 0755", p, h)
		}
	}
	for _, p := range []string{"bin/pgrep", "bin/ipcs", "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6"} {
		if h := e[p]; h == nil || h.Typeflag != tar.TypeReg {
			t.Errorf("%s: %+v, want a regular file", p, h)
		}
	}
	n := l.entries(t, e2eRegistry+"nonewprivs:1.3")["usr/local/bin/nonewprivs"]
	if n == nil || n.Mode != 0o4755 || n.Uid != 0 {
		t.Errorf("nonewprivs: %+v, want setuid root", n)
	}
	p := l.entries(t, sandboxImage)
	if h := p["pause"]; h == nil || h.Typeflag != tar.TypeReg || h.Mode != 0o755 {
		t.Errorf("pause: %+v, want an executable", h)
	}
}

func TestCritestRefusesAStaticBusybox(t *testing.T) {
	needBusybox(t)
	err := run([]string{"-o", filepath.Join(t.TempDir(), "x.tar"), "-critest", "-busybox", "/bin/busybox", "-standin", "/bin/busybox"})
	if err == nil || !strings.Contains(err.Error(), "statically linked") {
		t.Errorf("run = %v, want a statically linked error", err)
	}
}
