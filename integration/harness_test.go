// Package integration boots real microVMs (QEMU, TCG on these machines) and
// drives them through boxlite's packages. Every test that starts a VM ends
// with a leak assertion: no QEMU, zombie or child process it started is
// left, and no mount under its directories.
package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// repoRoot is the work tree, found from this package's directory.
var repoRoot = func() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}()

var (
	kernelPath = filepath.Join(repoRoot, "bin", "vmlinux")
	initrdPath = filepath.Join(repoRoot, "bin", "initramfs.cpio")
)

func TestMain(m *testing.M) {
	// The test binary is the subreaper and the one owner of wait for every
	// process it starts, exactly like the shim.
	reaper.Default()
	if msg := prerequisites(); msg != "" {
		fmt.Fprintln(os.Stderr, "integration: "+msg)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// prerequisites says what is missing to boot a guest here, with the fix.
// These tests must run on the project's machines, so a missing piece fails
// the run instead of skipping it.
func prerequisites() string {
	if os.Geteuid() != 0 {
		return "must run as root (QEMU 9p sharing of root-owned rootfs): sudo make integration"
	}
	if _, err := exec.LookPath(vmm.QEMUBinaryName); err != nil {
		return vmm.QEMUBinaryName + " not found: run make setup"
	}
	for _, p := range []string{kernelPath, initrdPath} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Sprintf("%s missing: run make build", p)
		}
	}
	return ""
}

// shortTempDir returns a short directory (unix socket paths are limited to
// 108 bytes) removed at cleanup.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// busyboxRootfs makes a busybox root filesystem like scripts/build-rootfs.sh.
func busyboxRootfs(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(shortTempDir(t), "rootfs")
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "tmp", "root", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "tmp"), 0o1777)
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static missing (run make setup): %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	list, err := runHost("/bin/busybox", "--list")
	if err != nil {
		t.Fatal(err)
	}
	for _, applet := range strings.Fields(list) {
		if applet != "busybox" {
			os.Symlink("busybox", filepath.Join(dir, "bin", applet))
		}
	}
	os.WriteFile(filepath.Join(dir, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc", "group"), []byte("root:x:0:\nuser:x:1000:\n"), 0o644)
	return dir
}

// runHost runs a short host command through the reaper and returns stdout.
func runHost(name string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		return "", err
	}
	if e.Status != 0 {
		return out.String(), fmt.Errorf("%s %v: %v: %s", name, args, e, errb.String())
	}
	return out.String(), nil
}

// vmOpts tunes a test VM.
type vmOpts struct {
	initrd      string
	kernelArgs  []string
	memoryMiB   int
	bootTimeout time.Duration
}

// startSandbox boots a VM with rootfs shared and registers its teardown and
// the leak assertion.
func startSandbox(t testing.TB, rootfs string, o vmOpts) *sandbox.Sandbox {
	t.Helper()
	sb, err := sandbox.Start(context.Background(), sandboxConfig(t, rootfs, o))
	if err != nil {
		t.Fatalf("start sandbox: %v", err)
	}
	pid := sb.Identity().Pid
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := sb.Stop(ctx); err != nil {
			t.Errorf("stop sandbox: %v", err)
		}
		assertNoLeaks(t, pid, rootfs)
	})
	return sb
}

func sandboxConfig(t testing.TB, rootfs string, o vmOpts) sandbox.Config {
	t.Helper()
	initrd := o.initrd
	if initrd == "" {
		initrd = initrdPath
	}
	return sandbox.Config{
		VM: vmm.Config{
			Kernel: kernelPath,
			Initrd: initrd,
			// The guest takes the rootfs from the share by its name.
			Share:      filepath.Dir(rootfs),
			StateDir:   shortTempDir(t),
			MemoryMiB:  o.memoryMiB,
			KernelArgs: o.kernelArgs,
		},
		BootTimeout: o.bootTimeout,
	}
}

// assertNoLeaks fails the test if the VMM pid is still present (even as a
// zombie), if any child of the test process is left, or if a mount under
// dir remains.
func assertNoLeaks(t testing.TB, vmmPid int, dirs ...string) {
	t.Helper()
	if vmmPid > 0 {
		if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", vmmPid)); err == nil {
			t.Errorf("leak: VMM pid %d still present:\n%s", vmmPid, statusLines(status))
		}
	}
	if kids := reaper.Children(os.Getpid()); len(kids) > 0 {
		var desc []string
		for _, k := range kids {
			status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", k))
			desc = append(desc, fmt.Sprintf("pid %d: %s", k, strings.ReplaceAll(statusLines(status), "\n", " ")))
		}
		t.Errorf("leak: %d live child process(es) of the test:\n%s", len(kids), strings.Join(desc, "\n"))
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		for _, d := range dirs {
			if d != "" && strings.Contains(line, d) {
				t.Errorf("leak: mount left under %s: %s", d, line)
			}
		}
	}
}

// statusLines picks the Name, State and PPid lines of /proc/<pid>/status.
func statusLines(status []byte) string {
	var out []string
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "Name:") || strings.HasPrefix(l, "State:") || strings.HasPrefix(l, "PPid:") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// newSpec returns containerd's default Linux spec for a box running args,
// with opts applied (the same spec ctr would send).
func newSpec(t testing.TB, id string, args []string, opts ...oci.SpecOpts) *specs.Spec {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "boxlite-test")
	// containerd's default spec has no PATH: ctr and the manager take it
	// from the image config; a busybox rootfs wants the default one.
	opts = append([]oci.SpecOpts{oci.WithDefaultPathEnv, oci.WithProcessArgs(args...), oci.WithRootFSPath("rootfs")}, opts...)
	s, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: id}, opts...)
	if err != nil {
		t.Fatalf("generate spec: %v", err)
	}
	return s
}
