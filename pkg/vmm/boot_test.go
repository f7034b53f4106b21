package vmm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// These tests boot a real microvm with a busybox initramfs built on the fly.
// They need QEMU, a guest kernel and a static busybox, and skip with the fix
// when one is missing.

// bootInit is the guest's /init. The kernel passes mode=... from its
// command line to init as an environment variable.
const bootInit = `#!/bin/busybox sh
/bin/busybox echo "boxlite-test: hello from init"
if [ "$mode" = sleep ]; then exec /bin/busybox sleep 3600; fi
if [ "$mode" = agent ]; then
	/bin/busybox mount -t devtmpfs dev /dev
	/bin/busybox mount -t sysfs sys /sys
	for p in /sys/class/virtio-ports/*; do
		if [ "$(/bin/busybox cat $p/name)" = agent ]; then
			/bin/busybox echo "ping from guest" > /dev/${p##*/}
		fi
	done
	exec /bin/busybox sleep 3600
fi
if [ "$mode" = 9p ]; then
	/bin/busybox mkdir -p /mnt
	/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L share /mnt
	/bin/busybox cat /mnt/marker
fi
/bin/busybox reboot -f
`

// bootVM returns a configured, unstarted VM whose guest prints a line and
// then reboots, or sleeps when mode is "sleep".
func bootVM(t *testing.T, mode string) *QEMU {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM: skipped in -short mode")
	}
	checkLeaks(t)
	if _, err := exec.LookPath(QEMUBinaryName); err != nil {
		t.Skipf("requires %s: run make setup", QEMUBinaryName)
	}
	kernel, err := FindKernel("")
	if err != nil {
		matches, _ := filepath.Glob("/var/cache/boxlite/kernel/*/vmlinux")
		if len(matches) == 0 {
			t.Skipf("requires a guest kernel: %v", err)
		}
		kernel = matches[0]
	}
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil || !bytes.Contains(busybox, []byte("BusyBox")) {
		t.Skip("requires a static /bin/busybox: apt-get install busybox-static")
	}
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	writeInitramfs(t, initrd, busybox)
	state := filepath.Join(dir, "state")
	rootfs := filepath.Join(dir, "root,fs") // a comma QEMU must not split on
	for _, d := range []string{state, rootfs} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(rootfs, "marker"), []byte("boxlite-test: marker from 9p\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	q, err := NewQEMU(Config{
		Kernel: kernel, Initrd: initrd, Share: rootfs, StateDir: state,
		Accel: AccelTCG, KernelArgs: []string{"mode=" + mode},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := q.Kill(); err != nil {
			t.Error(err)
		}
	})
	return q
}

// writeInitramfs writes a newc cpio archive with /init, /bin/busybox and
// /dev/console.
func writeInitramfs(t *testing.T, path string, busybox []byte) {
	t.Helper()
	var b bytes.Buffer
	ino := 1
	add := func(name string, mode uint32, rdev [2]int, data []byte) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
		ino++
		b.WriteString(name + "\x00")
		pad(&b)
		b.Write(data)
		pad(&b)
	}
	add("bin", 0o40755, [2]int{}, nil)
	add("dev", 0o40755, [2]int{}, nil)
	add("sys", 0o40755, [2]int{}, nil)
	add("dev/console", 0o20600, [2]int{5, 1}, nil)
	add("bin/busybox", 0o100755, [2]int{}, busybox)
	add("init", 0o100755, [2]int{}, []byte(bootInit))
	add("TRAILER!!!", 0, [2]int{}, nil)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func pad(b *bytes.Buffer) {
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
}

// waitConsole polls the console tail until a line contains want.
func waitConsole(t *testing.T, q *QEMU, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, l := range q.ConsoleTail(50) {
			if strings.Contains(l, want) {
				return
			}
		}
		select {
		case <-q.Done():
			t.Fatalf("vm exited before printing %q; console: %q", want, q.ConsoleTail(20))
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("no %q on the console; console: %q", want, q.ConsoleTail(20))
}

func TestBootGuestRebootExitsQEMUAndLogsConsole(t *testing.T) {
	q := bootVM(t, "reboot")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("qmp ready after %v", time.Since(t0))
	id := q.Identity()
	if got, err := reaper.ReadPidFile(filepath.Join(q.cfg.StateDir, PidFileName)); err != nil || got != id {
		t.Fatalf("pid file = %v, %v; want %v", got, err, id)
	}
	exit, err := q.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("exited after %v: %v", time.Since(t0), exit)
	if exit.Status != 0 {
		t.Errorf("exit status = %d, want 0; console: %q", exit.Status, q.ConsoleTail(20))
	}
	log, err := os.ReadFile(q.consolePath)
	if err != nil || !strings.Contains(string(log), "boxlite-test: hello from init") {
		t.Errorf("console.log = %q, %v; want the guest's greeting", log, err)
	}
	if _, err := os.Stat(filepath.Join(q.cfg.StateDir, PidFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file still there after exit: %v", err)
	}
	if err := q.Stop(ctx); err != nil {
		t.Errorf("stop after exit: %v", err)
	}
}

func TestBootRootfsIsSharedOver9p(t *testing.T) {
	q := bootVM(t, "9p")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, q, "boxlite-test: marker from 9p")
}

func TestBootStopQuitsThroughQMP(t *testing.T) {
	q := bootVM(t, "sleep")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, q, "hello from init")
	// Many waiters, and a concurrent second Stop.
	exits := make(chan reaper.Exit, 3)
	for range 3 {
		go func() {
			e, _ := q.Wait(ctx)
			exits <- e
		}()
	}
	stopCtx, stopCancel := context.WithTimeout(ctx, 6*time.Second)
	defer stopCancel()
	errs := make(chan error, 2)
	t0 := time.Now()
	for range 2 {
		go func() { errs <- q.Stop(stopCtx) }()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	t.Logf("stopped in %v", time.Since(t0))
	for range 3 {
		if e := <-exits; e.Status != 0 || e.Signal != 0 {
			t.Errorf("exit = %v, want a clean QMP quit", e)
		}
	}
	if time.Since(t0) > 4*time.Second {
		t.Errorf("stop took %v: QMP quit was not used", time.Since(t0))
	}
}

func TestBootKillReportsSIGKILL(t *testing.T) {
	q := bootVM(t, "sleep")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := q.Kill(); err != nil {
		t.Fatal(err)
	}
	e, err := q.Wait(ctx)
	if err != nil || e.Status != 137 {
		t.Fatalf("wait = %v, %v; want status 137", e, err)
	}
	for _, name := range []string{PidFileName, QMPSocketName, AgentSocketName} {
		if _, err := os.Stat(filepath.Join(q.cfg.StateDir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after kill: %v", name, err)
		}
	}
	if err := q.Kill(); err != nil {
		t.Errorf("second kill: %v", err)
	}
}

func TestBootStartFailureKillsAndQuotesConsole(t *testing.T) {
	q := bootVM(t, "reboot")
	// Not a kernel: QEMU exits during start with an error on stderr.
	bad := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(bad, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	q.cfg.Kernel = bad
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := q.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "console:") {
		t.Fatalf("start = %v; want an error quoting the console", err)
	}
	t.Log(err)
	select {
	case <-q.Done():
	default:
		t.Fatal("start failed but the vm is not done")
	}
	if _, err := os.Stat(filepath.Join(q.cfg.StateDir, PidFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left after a failed start: %v", err)
	}
}

func TestBootAgentPortReachesTheHostSocket(t *testing.T) {
	q := bootVM(t, "agent")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := q.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The socket accepts at once, before the guest has even booted.
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", q.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "ping from guest\n" {
		t.Fatalf("read %q, %v from the agent socket; console: %q", line, err, q.ConsoleTail(20))
	}
	if err := q.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// The VMM runs confined (issue 11): under QEMU's seccomp filter (-sandbox,
// every optional deny list), chrooted into its empty root, and its QMP and
// agent sockets only open to their owner. Verified two-sided: without
// -sandbox, /proc shows Seccomp 0; without the chmod, the sockets follow the
// umask.
func TestBootVMMIsConfined(t *testing.T) {
	q := bootVM(t, "sleep")
	q.cfg.Cgroup = fmt.Sprintf("boxlite-vmm-test-%d", os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The sockets are made at Start: a permissive umask must not reach them.
	old := unix.Umask(0)
	err := q.Start(ctx)
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Stop(ctx)
	waitConsole(t, q, "hello from init")
	cgroups, _ := os.ReadFile(procPid(q) + "/cgroup")
	if !strings.Contains(string(cgroups), "/"+q.cfg.Cgroup+"\n") {
		t.Errorf("the VMM is not in its cgroup %s:\n%s", q.cfg.Cgroup, cgroups)
	}
	q.mu.Lock()
	dirs := q.cg.dirs
	q.mu.Unlock()
	defer func() {
		q.Stop(ctx)
		for _, d := range dirs {
			if _, err := os.Stat(d); !os.IsNotExist(err) {
				t.Errorf("the VMM's cgroup %s left after it stopped: %v", d, err)
			}
		}
	}()
	status, err := os.ReadFile(procPid(q) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "\nSeccomp:\t2\n") {
		t.Errorf("the VMM is not under a seccomp filter:\n%s", status)
	}
	if root, err := os.Readlink(procPid(q) + "/root"); err != nil || root != q.rootPath {
		t.Errorf("the VMM's root is %q (%v), want its chroot %s", root, err, q.rootPath)
	}
	for _, sock := range []string{q.qmpPath, q.agentPath} {
		if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v (%v), want 0600", sock, fi.Mode().Perm(), err)
		}
	}
}
