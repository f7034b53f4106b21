package main

// The images cri-tools' CRI validation suite (critest v1.37) pulls or runs,
// rebuilt offline under their upstream names. Most are busybox with a user,
// a marker file or a program; which one each spec needs is written next to
// it below. The digest-pinned gcr.io/k8s-staging-cri-tools/test-image-digest
// cannot be rebuilt bit for bit and is left out (its spec is skipped).
//
// The busybox is Debian's dynamically linked one, its applets hard links:
// a static busybox runs applets in-process or through /proc/self/exe, so a
// MaskedPaths spec masking /bin/ls would not stop `sh -c ls`, and with
// symlinks masking /bin/ls would mask busybox itself. Debian's busybox has
// no pgrep and no ipcs, which specs run: small shell stand-ins take their
// place.

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Registries of the suite's images.
const (
	e2eRegistry = "registry.k8s.io/e2e-test-images/"
	criRegistry = "gcr.io/k8s-staging-cri-tools/"
	// sandboxImage is containerd 2.4's default pinned sandbox image; the
	// integration harness pins it explicitly and serves it from here.
	sandboxImage = "registry.k8s.io/pause:3.10.2"
)

// critestPasswd and critestGroup are busybox's own users and groups
// (specs run as nobody and look up www-data).
const (
	critestPasswd = "root:x:0:0:root:/root:/bin/sh\n" +
		"daemon:x:1:1:daemon:/usr/sbin:/bin/false\n" +
		"bin:x:2:2:bin:/bin:/bin/false\n" +
		"sys:x:3:3:sys:/dev:/bin/false\n" +
		"sync:x:4:100:sync:/bin:/bin/sync\n" +
		"mail:x:8:8:mail:/var/spool/mail:/bin/false\n" +
		"www-data:x:33:33:www-data:/var/www:/bin/false\n" +
		"operator:x:37:37:Operator:/var:/bin/false\n" +
		"nobody:x:65534:65534:nobody:/home:/bin/false\n"
	critestGroup = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\n" +
		"lp:x:7:\nmail:x:8:\nkmem:x:9:\nwheel:x:10:root\ncdrom:x:11:\ndialout:x:18:\nfloppy:x:19:\n" +
		"video:x:28:\naudio:x:29:\ntape:x:32:\nwww-data:x:33:\noperator:x:37:\nutmp:x:43:\n" +
		"staff:x:50:\nusers:x:100:\nnogroup:x:65534:\n"
)

// pgrepScript and ipcsScript stand in for the procps and util-linux tools
// Debian's busybox lacks, as far as the specs use them.
const (
	pgrepScript = `#!/bin/sh
# pgrep NAME: the pids of the processes named NAME (boxlite stand-in).
st=1
for d in /proc/[0-9]*; do
	if [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ]; then
		echo "${d#/proc/}"
		st=0
	fi
done
exit $st
`
	ipcsScript = `#!/bin/sh
# ipcs [-m]: the System V shared memory segments (boxlite stand-in).
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch"
tail -n +2 /proc/sysvipc/shm | while read -r key shmid perms size cpid lpid nattch uid rest; do
	echo "$key $shmid $uid $perms $size $nattch"
done
`
)

// critestImages builds the suite's images from a dynamically linked
// busybox and the static boxlite-standin binary.
func critestImages(busybox, standin string) ([]image, error) {
	base, err := dynamicBusyboxLayer(busybox)
	if err != nil {
		return nil, err
	}
	tools, err := standinLayer(standin)
	if err != nil {
		return nil, err
	}
	nnp, err := nonewprivsLayer(standin)
	if err != nil {
		return nil, err
	}
	group, err := predefinedGroupLayer()
	if err != nil {
		return nil, err
	}
	// Marker layers: an empty file named after the image makes it distinct.
	markers := map[string]layer{}
	for _, name := range []string{"pause-3.9", "same-image", "test-image-1", "test-image-2", "test-image-3", "test-image-latest", "test", "all"} {
		if markers[name], err = markerLayer(name); err != nil {
			return nil, err
		}
	}
	marker := func(name string) layer { return markers[name] }
	shell := ocispec.ImageConfig{Env: []string{defaultPath}, Cmd: []string{"sh"}, WorkingDir: "/"}
	withUser := func(user string) ocispec.ImageConfig {
		c := shell
		c.User = user
		return c
	}
	withCmd := func(cmd ...string) ocispec.ImageConfig {
		c := shell
		c.Cmd = cmd
		return c
	}
	pause := ocispec.ImageConfig{Entrypoint: []string{"/pause"}, User: "65535:65535", WorkingDir: "/"}
	images := []image{
		// The pod sandbox: a process named pause (specs run `pgrep sleep`
		// in pods sharing its PID namespace).
		{names: []string{sandboxImage}, config: pause, layers: []layer{tools}},
		// The same image from two registries, not the sandbox image (a
		// spec removes it).
		{names: []string{"registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"}, config: pause,
			layers: []layer{tools, marker("pause-3.9")}},
		// The default container image.
		{names: []string{e2eRegistry + "busybox:1.29-2"}, config: shell, layers: []layer{base}},
		// Web servers: nginx on :80 (pid file, master-process title),
		// httpd on :80 (logs naming httpd), nginx on the host's :12003.
		{names: []string{e2eRegistry + "nginx:1.14-2"}, config: withCmd("nginx", "-g", "daemon off;"),
			layers: []layer{base, tools}},
		{names: []string{e2eRegistry + "httpd:2.4.39-4"}, config: withCmd("httpd-foreground"),
			layers: []layer{base, tools}},
		{names: []string{criRegistry + "hostnet-nginx-amd64:latest"}, config: withCmd("nginx", "-listen", ":12003"),
			layers: []layer{base, tools}},
		// A setuid-root program printing its effective uid.
		{names: []string{e2eRegistry + "nonewprivs:1.3"}, config: withCmd("/usr/local/bin/nonewprivs"),
			layers: []layer{base, nnp}},
		// USER 1000, who belongs to group 50000 defined in the image.
		{names: []string{criRegistry + "test-image-predefined-group:latest"}, config: withUser("1000"),
			layers: []layer{base, group}},
		// Images with a user but nothing to run.
		{names: []string{criRegistry + "test-image-user-uid:latest"}, config: withUser("1002"), layers: []layer{base}},
		{names: []string{criRegistry + "test-image-user-username:latest"}, config: withUser("www-data"), layers: []layer{base}},
		{names: []string{criRegistry + "test-image-user-uid-group:latest"}, config: withUser("1003:1004"), layers: []layer{base}},
		{names: []string{criRegistry + "test-image-user-username-group:latest"}, config: withUser("www-data:1004"), layers: []layer{base}},
		// One image under three tags.
		{names: []string{criRegistry + "test-image-tags:1", criRegistry + "test-image-tags:2", criRegistry + "test-image-tags:3"},
			config: shell, layers: []layer{base, marker("same-image")}},
	}
	// Distinct images, each with its marker, as upstream.
	for _, name := range []string{"test-image-1", "test-image-2", "test-image-3", "test-image-latest"} {
		images = append(images, image{names: []string{criRegistry + name + ":latest"}, config: shell, layers: []layer{base, marker(name)}})
	}
	for _, tag := range []string{"test", "all"} {
		images = append(images, image{names: []string{criRegistry + "test-image-tag:" + tag}, config: shell, layers: []layer{base, marker(tag)}})
	}
	return images, nil
}

// dynamicBusyboxLayer builds the base layer: the usual directories, the
// dynamically linked busybox with the shared libraries it needs (taken from
// this host), a hard link per applet, the pgrep and ipcs stand-ins, and
// busybox's users and groups.
func dynamicBusyboxLayer(path string) (layer, error) {
	bb, err := os.ReadFile(path)
	if err != nil {
		return layer{}, fmt.Errorf("read busybox: %w", err)
	}
	if checkStatic(path) == nil {
		return layer{}, fmt.Errorf("%s is statically linked: critest's images need a dynamic busybox (Debian's busybox package), whose applets MaskedPaths can mask", path)
	}
	libs, err := sharedLibraries(path)
	if err != nil {
		return layer{}, err
	}
	applets, err := listApplets(path)
	if err != nil {
		return layer{}, err
	}
	b := newLayerBuilder()
	dirs := []struct {
		name string
		mode int64
	}{
		{"bin/", 0o755}, {"dev/", 0o755}, {"etc/", 0o755}, {"home/", 0o755}, {"lib/", 0o755},
		{"lib/x86_64-linux-gnu/", 0o755}, {"lib64/", 0o755}, {"proc/", 0o555}, {"root/", 0o700},
		{"run/", 0o755}, {"sys/", 0o555}, {"tmp/", 0o1777}, {"usr/", 0o755}, {"usr/bin/", 0o755},
		{"usr/sbin/", 0o755}, {"usr/local/", 0o755}, {"usr/local/bin/", 0o755}, {"var/", 0o755},
		{"var/run/", 0o755}, {"var/tmp/", 0o1777}, {"var/www/", 0o755},
	}
	for _, d := range dirs {
		if err := b.dir(d.name, d.mode, 0, 0); err != nil {
			return layer{}, err
		}
	}
	for _, l := range libs {
		if err := b.file(l.name, 0o755, l.data); err != nil {
			return layer{}, err
		}
	}
	if err := b.file("bin/busybox", 0o755, bb); err != nil {
		return layer{}, err
	}
	for _, a := range applets {
		if err := b.link("bin/"+a, "bin/busybox", 0o755); err != nil {
			return layer{}, err
		}
	}
	for _, f := range []struct{ name, data string }{
		{"bin/pgrep", pgrepScript}, {"bin/ipcs", ipcsScript},
	} {
		if slices.Contains(applets, filepath.Base(f.name)) {
			continue
		}
		if err := b.file(f.name, 0o755, []byte(f.data)); err != nil {
			return layer{}, err
		}
	}
	for _, f := range []struct{ name, data string }{{"etc/passwd", critestPasswd}, {"etc/group", critestGroup}} {
		if err := b.file(f.name, 0o644, []byte(f.data)); err != nil {
			return layer{}, err
		}
	}
	return b.finish("busybox (dynamic) with its libraries")
}

// libFile is a shared library (or the dynamic loader) for the image: its
// path there, relative, and its content.
type libFile struct {
	name string
	data []byte
}

// libDirs are where the loader of a Debian amd64 system finds libraries
// without ld.so.cache; the image keeps each library at the path it was
// found at here.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"}

// sharedLibraries returns the dynamic loader and every library the ELF
// binary at path needs, transitively, read from this host.
func sharedLibraries(path string) ([]libFile, error) {
	var out []libFile
	seen := map[string]bool{}
	read := func(hostPath string) error {
		data, err := os.ReadFile(hostPath)
		if err != nil {
			return err
		}
		out = append(out, libFile{name: hostPath[1:], data: data})
		return nil
	}
	queue := []string{path}
	for len(queue) > 0 {
		f, err := elf.Open(queue[0])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", queue[0], err)
		}
		interp, needed, err := elfDeps(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", queue[0], err)
		}
		queue = queue[1:]
		if interp != "" && !seen[interp] {
			seen[interp] = true
			if err := read(interp); err != nil {
				return nil, fmt.Errorf("dynamic loader: %w", err)
			}
		}
		for _, lib := range needed {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("shared library %s not found in %v", lib, libDirs)
			}
			if err := read(found); err != nil {
				return nil, err
			}
			queue = append(queue, found)
		}
	}
	return out, nil
}

// elfDeps returns an ELF file's interpreter ("" for none) and the
// libraries it needs.
func elfDeps(f *elf.File) (string, []string, error) {
	var interp string
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			data := make([]byte, p.Filesz)
			if _, err := p.ReadAt(data, 0); err != nil {
				return "", nil, err
			}
			interp = string(data[:len(data)-1]) // NUL-terminated
		}
	}
	needed, err := f.ImportedLibraries()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return "", nil, err
	}
	return interp, needed, nil
}

// standinLayer holds boxlite-standin as /pause, /usr/sbin/nginx and
// /usr/local/bin/httpd-foreground (hard links: one file, three roles).
func standinLayer(path string) (layer, error) {
	data, err := readStatic(path)
	if err != nil {
		return layer{}, err
	}
	b := newLayerBuilder()
	for _, d := range []string{"usr/", "usr/sbin/", "usr/local/", "usr/local/bin/"} {
		if err := b.dir(d, 0o755, 0, 0); err != nil {
			return layer{}, err
		}
	}
	if err := b.file("pause", 0o755, data); err != nil {
		return layer{}, err
	}
	for _, name := range []string{"usr/sbin/nginx", "usr/local/bin/httpd-foreground"} {
		if err := b.link(name, "pause", 0o755); err != nil {
			return layer{}, err
		}
	}
	return b.finish("boxlite-standin as pause, nginx and httpd-foreground")
}

// nonewprivsLayer holds boxlite-standin as /usr/local/bin/nonewprivs,
// setuid root.
func nonewprivsLayer(path string) (layer, error) {
	data, err := readStatic(path)
	if err != nil {
		return layer{}, err
	}
	b := newLayerBuilder()
	for _, d := range []string{"usr/", "usr/local/", "usr/local/bin/"} {
		if err := b.dir(d, 0o755, 0, 0); err != nil {
			return layer{}, err
		}
	}
	if err := b.file("usr/local/bin/nonewprivs", 0o4755, data); err != nil {
		return layer{}, err
	}
	return b.finish("boxlite-standin as nonewprivs, setuid root")
}

// readStatic reads a statically linked program.
func readStatic(path string) ([]byte, error) {
	if err := checkStatic(path); err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// predefinedGroupLayer adds default-user (uid 1000, primary group 1000)
// and the group 50000 it belongs to, as upstream's adduser/addgroup do.
func predefinedGroupLayer() (layer, error) {
	b := newLayerBuilder()
	if err := b.dir("home/default-user/", 0o755, 1000, 1000); err != nil {
		return layer{}, err
	}
	passwd := critestPasswd + "default-user:x:1000:1000::/home/default-user:/bin/sh\n"
	group := critestGroup + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
	for _, f := range []struct{ name, data string }{{"etc/passwd", passwd}, {"etc/group", group}} {
		if err := b.file(f.name, 0o644, []byte(f.data)); err != nil {
			return layer{}, err
		}
	}
	return b.finish("default-user in group-defined-in-image")
}

// markerLayer adds an empty file /name, which makes an image distinct.
func markerLayer(name string) (layer, error) {
	b := newLayerBuilder()
	if err := b.file(name, 0o644, nil); err != nil {
		return layer{}, err
	}
	return b.finish("marker " + name)
}
