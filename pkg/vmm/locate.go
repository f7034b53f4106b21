package vmm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
)

// Guest image file names and the environment variables that override them.
const (
	KernelName = "vmlinux"
	InitrdName = "initramfs.cpio"
	KernelEnv  = "BOXLITE_KERNEL"
	InitrdEnv  = "BOXLITE_INITRD"
)

// Fixes quoted by errors about missing guest images.
const (
	kernelFix = "run make kernel"
	initrdFix = "run make initramfs"
)

// shareDirs are the installed locations searched after the executable's
// directory.
var shareDirs = []string{"/usr/local/share/boxlite", "/usr/share/boxlite"}

// FindKernel returns the absolute path of the guest kernel: path if not
// empty, else $BOXLITE_KERNEL if set, else the first vmlinux next to the
// running executable, in ../share/boxlite from it, in
// /usr/local/share/boxlite or in /usr/share/boxlite.
// The file must exist; the error says how to get it.
func FindKernel(path string) (string, error) {
	return findImage("kernel", KernelName, path, KernelEnv, kernelFix)
}

// FindInitrd returns the guest initramfs, chosen like FindKernel's kernel
// with $BOXLITE_INITRD and initramfs.cpio.
func FindInitrd(path string) (string, error) {
	return findImage("initramfs", InitrdName, path, InitrdEnv, initrdFix)
}

func findImage(what, name, path, env, fix string) (string, error) {
	if path == "" {
		path = os.Getenv(env)
	}
	if path == "" {
		var err error
		if path, err = locate(what, name, searchDirs(), fix); err != nil {
			return "", err
		}
	}
	return checkFile(what, path, fix)
}

// searchDirs is the executable's directory, then <prefix>/share/boxlite
// for an executable in <prefix>/bin (so make install PREFIX=... works
// without configuration), then shareDirs.
func searchDirs() []string {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		dir := filepath.Dir(exe)
		dirs = append(dirs, dir, filepath.Join(dir, "..", "share", "boxlite"))
	}
	return append(dirs, shareDirs...)
}

// locate returns the first dir/name that is a regular file. The error names
// every path searched and ends with fix.
func locate(what, name string, dirs []string, fix string) (string, error) {
	var tried []string
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
		tried = append(tried, p)
	}
	switch len(tried) {
	case 0:
		return "", classify(errdefs.ErrNotFound, fmt.Errorf("no %s %s found: %s", what, name, fix))
	case 1:
		return "", classify(errdefs.ErrNotFound, fmt.Errorf("%s %s missing: %s", what, tried[0], fix))
	}
	return "", classify(errdefs.ErrNotFound,
		fmt.Errorf("%s %s missing (also looked in %s): %s", what, tried[0], strings.Join(tried[1:], ", "), fix))
}
