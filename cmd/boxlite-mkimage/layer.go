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
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	add := func(h *tar.Header, data []byte) error {
		h.ModTime, h.Format = epoch, tar.FormatPAX
		h.Uname, h.Gname = "", ""
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
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
		if err := add(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode, Uid: d.uid, Gid: d.gid}, nil); err != nil {
			return layer{}, err
		}
	}
	if err := add(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bb))}, bb); err != nil {
		return layer{}, err
	}
	for _, a := range applets {
		if err := add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}, nil); err != nil {
			return layer{}, err
		}
	}
	for _, f := range []struct{ name, data string }{{"etc/passwd", passwd}, {"etc/group", group}} {
		if err := add(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data))}, []byte(f.data)); err != nil {
			return layer{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return layer{}, err
	}
	var gz bytes.Buffer
	// A zero gzip header (no name, no mtime) keeps the blob reproducible.
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	if err != nil {
		return layer{}, err
	}
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return layer{}, err
	}
	if err := zw.Close(); err != nil {
		return layer{}, err
	}
	return layer{gz: gz.Bytes(), diffID: fmt.Sprintf("sha256:%x", sha256.Sum256(raw.Bytes()))}, nil
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
