package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeKernelSource writes a tiny stand-in for Debian's linux-source tarball:
// a top directory whose Makefile and merge_config.sh do just enough for
// scripts/build-kernel.sh (a .config holding the fragment, a "vmlinux").
func fakeKernelSource(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	tree := filepath.Join(dir, "linux-fake")
	files := map[string]string{
		"Makefile": "allnoconfig:\n\t@: > .config\nolddefconfig:\n\t@:\nvmlinux:\n\t@echo fake-vmlinux > vmlinux\n",
		// Keeps every option of the fragment except those set to n.
		"scripts/kconfig/merge_config.sh": "#!/bin/sh\nfor last; do :; done\ngrep -v -e '^#' -e '^$' -e '=n$' \"$last\" >> .config\n",
	}
	for name, content := range files {
		p := filepath.Join(tree, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tarball := filepath.Join(dir, "linux-fake.tar.xz")
	if out, err := exec.Command("tar", "-C", dir, "-cJf", tarball, "linux-fake").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	return tarball
}

// TestBuildKernelWritesARelativeOutputWhereItWasAsked runs the kernel build
// script with an empty cache, from a directory of its own, with a relative
// output path, as `make kernel` does on a fresh machine. The first build
// used to change into the build tree and then copy to the relative path
// from there, writing the kernel outside the work tree and leaving the
// asked-for file missing. Verified two-sided: with the script's
// `out=$(realpath ...)` line and its subshell reverted, the output is
// missing and this test fails; with them it passes.
func TestBuildKernelWritesARelativeOutputWhereItWasAsked(t *testing.T) {
	src := fakeKernelSource(t)
	cache := t.TempDir()
	for _, run := range []string{"cold cache", "warm cache"} {
		cwd := t.TempDir()
		const out = "boxlite-test-out/vmlinux"
		cmd := exec.Command("bash", filepath.Join(repoRoot, "scripts", "build-kernel.sh"), out)
		cmd.Dir = cwd
		cmd.Env = append(os.Environ(), "BOXLITE_CACHE="+cache, "BOXLITE_KERNEL_SOURCE="+src)
		logs, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: build-kernel.sh: %v\n%s", run, err, logs)
		}
		// Where the old script wrote it, relative to the build tree or /.
		t.Cleanup(func() { os.RemoveAll("/boxlite-test-out") })
		got, err := os.ReadFile(filepath.Join(cwd, out))
		if err != nil {
			t.Fatalf("%s: the kernel is not at %s relative to the caller: %v\n%s", run, out, err, logs)
		}
		if strings.TrimSpace(string(got)) != "fake-vmlinux" {
			t.Errorf("%s: output holds %q", run, got)
		}
	}
	// The build tree is gone; the cached kernel stays.
	if entries, _ := os.ReadDir(filepath.Join(cache, "build")); len(entries) > 0 {
		t.Errorf("build tree left in the cache: %v", entries)
	}
	if m, _ := filepath.Glob(filepath.Join(cache, "kernel", "*", "vmlinux")); len(m) != 1 {
		t.Errorf("cached kernels: %v, want one", m)
	}
}
