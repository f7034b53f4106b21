package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"
)

// epoch is every file's modification time and the config's creation time,
// so the output does not depend on when it was built.
var epoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// layer is a compressed layer and the digests the image needs.
type layer struct {
	// gz is the tar+gzip blob.
	gz []byte
	// diffID is the sha256 of the uncompressed tar, as "sha256:<hex>".
	diffID string
	// createdBy describes the layer in the image's history.
	createdBy string
}

// layerBuilder writes a layer's tar stream: every entry owned by uid/gid
// numbers only, dated epoch, in PAX format, so the layer is reproducible.
type layerBuilder struct {
	raw bytes.Buffer
	tw  *tar.Writer
}

func newLayerBuilder() *layerBuilder {
	b := &layerBuilder{}
	b.tw = tar.NewWriter(&b.raw)
	return b
}

// add writes one entry and its data.
func (b *layerBuilder) add(h *tar.Header, data []byte) error {
	h.ModTime, h.Format = epoch, tar.FormatPAX
	h.Uname, h.Gname = "", ""
	if err := b.tw.WriteHeader(h); err != nil {
		return err
	}
	_, err := b.tw.Write(data)
	return err
}

// dir adds a directory; name ends with a slash.
func (b *layerBuilder) dir(name string, mode int64, uid, gid int) error {
	return b.add(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: gid}, nil)
}

// file adds a regular file owned by root.
func (b *layerBuilder) file(name string, mode int64, data []byte) error {
	return b.add(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))}, data)
}

// link adds a hard link to target, an earlier entry of the layer. Its mode
// must be the target's: unpacking applies a link entry's mode to the file.
func (b *layerBuilder) link(name, target string, mode int64) error {
	return b.add(&tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: mode}, nil)
}

// finish closes the tar stream and compresses it.
func (b *layerBuilder) finish(createdBy string) (layer, error) {
	if err := b.tw.Close(); err != nil {
		return layer{}, err
	}
	var gz bytes.Buffer
	// A zero gzip header (no name, no mtime) keeps the blob reproducible.
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	if err != nil {
		return layer{}, err
	}
	if _, err := zw.Write(b.raw.Bytes()); err != nil {
		return layer{}, err
	}
	if err := zw.Close(); err != nil {
		return layer{}, err
	}
	return layer{gz: gz.Bytes(), diffID: fmt.Sprintf("sha256:%x", sha256.Sum256(b.raw.Bytes())), createdBy: createdBy}, nil
}

// passwd and group are the image's users: root, an unprivileged user with a
// home directory, and nobody.
const (
	passwd = "root:x:0:0:root:/root:/bin/sh\n" +
		"user:x:1000:1000:user:/home/user:/bin/sh\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	group = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"
)

// busyboxLayer builds the one layer: the directories an OCI runtime expects,
// /bin/busybox from path (which must be statically linked: the image has no
// libc), a relative symlink per applet, and /etc/passwd and /etc/group.
func busyboxLayer(path string) (layer, error) {
	bb, err := os.ReadFile(path)
	if err != nil {
		return layer{}, fmt.Errorf("read busybox (apt-get install busybox-static): %w", err)
	}
	if err := checkStatic(path); err != nil {
		return layer{}, err
	}
	applets, err := listApplets(path)
	if err != nil {
		return layer{}, err
	}
	b := newLayerBuilder()
	dirs := []struct {
		name     string
		mode     int64
		uid, gid int
	}{
		{"bin/", 0o755, 0, 0}, {"dev/", 0o755, 0, 0}, {"etc/", 0o755, 0, 0},
		{"home/", 0o755, 0, 0}, {"home/user/", 0o755, 1000, 1000}, {"proc/", 0o555, 0, 0},
		{"root/", 0o700, 0, 0}, {"run/", 0o755, 0, 0}, {"sys/", 0o555, 0, 0},
		{"tmp/", 0o1777, 0, 0}, {"usr/", 0o755, 0, 0}, {"usr/bin/", 0o755, 0, 0},
		{"var/", 0o755, 0, 0}, {"var/tmp/", 0o1777, 0, 0},
	}
	for _, d := range dirs {
		if err := b.dir(d.name, d.mode, d.uid, d.gid); err != nil {
			return layer{}, err
		}
	}
	if err := b.file("bin/busybox", 0o755, bb); err != nil {
		return layer{}, err
	}
	for _, a := range applets {
		if err := b.add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}, nil); err != nil {
			return layer{}, err
		}
	}
	for _, f := range []struct{ name, data string }{{"etc/passwd", passwd}, {"etc/group", group}} {
		if err := b.file(f.name, 0o644, []byte(f.data)); err != nil {
			return layer{}, err
		}
	}
	return b.finish("busybox-static")
}

// checkStatic fails unless path is an ELF executable without an interpreter.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s is not an ELF binary: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked: the image has no libc (apt-get install busybox-static)", path)
		}
	}
	return nil
}

// listApplets asks busybox for its applets, sorted, without busybox itself.
func listApplets(path string) ([]string, error) {
	out, err := exec.Command(path, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", path, err)
	}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		if a != "busybox" && !strings.Contains(a, "/") {
			applets = append(applets, a)
		}
	}
	sort.Strings(applets)
	if len(applets) == 0 {
		return nil, fmt.Errorf("%s --list printed no applets", path)
	}
	return applets, nil
}
