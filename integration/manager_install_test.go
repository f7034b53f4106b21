package integration

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestManagerMakeInstallWithAPrefixRunsABox: make install PREFIX=P puts the
// manager and the shim in P/bin and the guest images in P/share/boxlite,
// where the installed binaries find them with no configuration; a box runs
// from there; make uninstall removes every file. Verified two-sided: before
// the ../share/boxlite lookup, the installed boxlite failed "guest kernel not
// found" (tried .../bin/vmlinux, /usr/local/share/boxlite/vmlinux, ...).
func TestManagerMakeInstallWithAPrefixRunsABox(t *testing.T) {
	m := newMgr(t)
	prefix := filepath.Join(shortTempDir(t), "pfx")
	makeArgs := func(target string) []string {
		return []string{"-C", repoRoot, "--no-print-directory", target, "PREFIX=" + prefix}
	}
	if out, err := runHostTimeout(10*time.Minute, "make", makeArgs("install")...); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	installed := []string{
		"bin/boxlite", "bin/containerd-shim-boxlite-v1",
		"share/boxlite/vmlinux", "share/boxlite/initramfs.cpio",
	}
	for _, f := range installed {
		if _, err := os.Stat(filepath.Join(prefix, f)); err != nil {
			t.Fatalf("make install: %v", err)
		}
	}

	m.binary = filepath.Join(prefix, "bin", "boxlite")
	// Nothing points at the work tree: no BOXLITE_KERNEL/INITRD, and the
	// shim is found next to the installed boxlite.
	for _, env := range []string{"BOXLITE_KERNEL", "BOXLITE_INITRD"} {
		t.Setenv(env, "")
		os.Unsetenv(env)
	}
	r := m.run(nil, "check")
	if r.code != 0 || !strings.Contains(r.stdout, filepath.Join(prefix, "share/boxlite/vmlinux")) {
		t.Fatalf("installed boxlite check: %v", r)
	}
	r = m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "sh", "-c", "echo hi; exit 3")
	if r.code != 3 || r.stdout != "hi\n" {
		t.Fatalf("installed boxlite run: %v", r)
	}

	m.binary = boxliteBin // the leak check runs after the uninstall
	if out, err := runHostTimeout(time.Minute, "make", makeArgs("uninstall")...); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	for _, f := range append(installed, "share/boxlite") {
		if _, err := os.Stat(filepath.Join(prefix, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after make uninstall, %s: %v", f, err)
		}
	}
}
