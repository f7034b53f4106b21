package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// virtiofsdPath is where Debian 12's QEMU 7.2 (qemu-system-common) ships the
// C virtiofsd.
const virtiofsdPath = "/usr/lib/qemu/virtiofsd"

// Shape of the small-file archive: files of 1 to 4 KiB spread over a few
// directories.
const (
	archiveFiles = 1000
	archiveDirs  = 10
)

// smallFilesTar returns a tar archive of archiveFiles files of 1-4 KiB in
// archiveDirs directories (the same bytes every run), and the total size of
// the files in it.
func smallFilesTar(t testing.TB) ([]byte, int64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	now := time.Now()
	var total int64
	for d := 0; d < archiveDirs; d++ {
		dir := fmt.Sprintf("d%02d/", d)
		if err := w.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: now}); err != nil {
			t.Fatal(err)
		}
		for f := 0; f < archiveFiles/archiveDirs; f++ {
			data := make([]byte, 1024+rng.IntN(3*1024+1))
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			hdr := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sf%03d", dir, f), Mode: 0o644, Size: int64(len(data)), ModTime: now}
			if err := w.WriteHeader(hdr); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			total += int64(len(data))
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), total
}

// treeSize counts the regular files under dir and their bytes.
func treeSize(dir string) (files int, bytes int64, err error) {
	err = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		files++
		bytes += info.Size()
		return nil
	})
	return files, bytes, err
}

// syncfsDir flushes the file system holding dir (syncfs(2)), so one run's
// dirty data is not written back during the next.
func syncfsDir(t testing.TB, dir string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatal(os.NewSyscallError("syncfs", err))
	}
}

// tscstampSource is a helper the workload takes its timestamps from, in the
// guests and on the host alike: it answers each line read from the request
// FIFO with the CPU's time-stamp counter on the response FIFO, and with -hz
// prints the counter's rate against CLOCK_MONOTONIC. One counter read the
// same way in guests and host keeps the comparison independent of the
// guest's clocksource (before pkg/vmm handed TCG guests the host's TSC
// frequency, a guest that failed to calibrate its TSC ran on refined-jiffies,
// which steps by 4 ms and lost 0.5 s in a 10 s untar). TCG's guest TSC is the
// host's, at the host's rate. The script reaches the helper with shell
// builtins only (no fork).
var tscstampSource = map[string]string{
	"go.mod": "module tscstamp\n\ngo 1.22\n",
	"main.go": `// Command tscstamp answers each request line with the time-stamp counter.
package main

import (
	"bufio"
	"fmt"
	"os"
	"time"
)

// rdtsc returns the time-stamp counter.
func rdtsc() uint64

func main() {
	if len(os.Args) == 2 && os.Args[1] == "-hz" {
		t0, c0 := time.Now(), rdtsc()
		time.Sleep(time.Second / 2)
		c1, t1 := rdtsc(), time.Now()
		fmt.Println(float64(c1-c0) / t1.Sub(t0).Seconds())
		return
	}
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: tscstamp REQUEST-FIFO RESPONSE-FIFO | tscstamp -hz")
		os.Exit(2)
	}
	req, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	resp, err := os.OpenFile(os.Args[2], os.O_WRONLY, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	r := bufio.NewReader(req)
	for {
		if _, err := r.ReadString('\n'); err != nil {
			return
		}
		if _, err := fmt.Fprintln(resp, rdtsc()); err != nil {
			os.Exit(1)
		}
	}
}
`,
	"rdtsc_amd64.s": `#include "textflag.h"

// func rdtsc() uint64
TEXT ·rdtsc(SB), NOSPLIT, $0-8
	RDTSC
	SHLQ $32, DX
	ORQ  DX, AX
	MOVQ AX, ret+0(FP)
	RET
`,
}

// buildTSCStamp builds the tscstamp helper (static, x86-64 like the guest)
// and returns its path.
func buildTSCStamp(t testing.TB) string {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skipf("the TSC timestamp helper is x86-64 only (GOARCH=%s)", runtime.GOARCH)
	}
	src := shortTempDir(t)
	for name, text := range tscstampSource {
		if err := os.WriteFile(filepath.Join(src, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(src, "tscstamp")
	gocmd, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("builds a timestamp helper: requires the go command in PATH: %v", err)
	}
	cmd := exec.Command(gocmd, "build", "-trimpath", "-o", out, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOWORK=off", "GOFLAGS=", "GOTOOLCHAIN=local")
	var errb lockedBuffer
	cmd.Stderr = &errb
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if e, err := p.Wait(ctx); err != nil || e.Status != 0 {
		p.Signal(syscall.SIGKILL)
		p.Wait(context.Background())
		t.Fatalf("build tscstamp: %v %v: %s", e, err, errb.String())
	}
	return out
}

// tscHz returns the host's TSC rate, the median of three measurements.
func tscHz(t testing.TB, tscstamp string) float64 {
	t.Helper()
	var hz []float64
	for i := 0; i < 3; i++ {
		out, err := runHost(tscstamp, "-hz")
		if err != nil {
			t.Fatal(err)
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(out), 64)
		if err != nil || f <= 0 {
			t.Fatalf("tscstamp -hz printed %q: %v", out, err)
		}
		hz = append(hz, f)
	}
	slices.Sort(hz)
	return hz[1]
}

// virtiofsGuest is one boot of the guest kernel with a host directory
// exported by virtiofsd: its /init (virtiofsInitrd) mounts the export at
// /vol, runs a command whose output goes to the console, and reboots, which
// with -no-reboot ends QEMU.
type virtiofsGuest struct {
	// dir is the exported host directory.
	dir string
	// initrd is the initramfs built by virtiofsInitrd.
	initrd string
	// memoryMiB and vcpus size the VM.
	memoryMiB, vcpus int
	// accel is the accelerator boxlite would pick here.
	accel vmm.Accel
	// cache is virtiofsd's cache mode ("": its default, auto).
	cache string
}

// virtiofsTag is the virtio-fs tag the guest mounts.
const virtiofsTag = "vol"

// virtiofsGuestTimeout bounds one virtio-fs guest, boot to QEMU's exit
// (about 5 s under TCG).
const virtiofsGuestTimeout = 2 * time.Minute

// virtiofsInitrd builds the initramfs of a virtiofsGuest: busybox with /dev,
// /sys and /proc mounted, a tmpfs on /run (as in a box), the export on
// /vol, then cmd; "BENCH-EXIT <status>" follows its output. The guest does
// not unmount /vol before rebooting: on this kernel (6.1) with QEMU 7.2's
// virtiofsd, umount hung now and then (about 1 run in 8) in
// virtio_fs_drain_queue, and the reboot after it never came. reboot -f
// syncs first, and the workload synced already.
func virtiofsInitrd(t testing.TB, cmd string) string {
	t.Helper()
	return fakeInitrd(t, "mkdir -p /run /vol\n"+
		"mount -t tmpfs run /run\n"+
		"if mount -t virtiofs "+virtiofsTag+" /vol; then\n"+
		"\t"+cmd+"\n"+
		"\techo BENCH-EXIT $?\n"+
		"else\n"+
		"\techo BENCH-EXIT mount\n"+
		"fi\n"+
		"reboot -f\n")
}

// virtiofsRun is what one virtiofsGuest boot did.
type virtiofsRun struct {
	// console is the guest's serial output.
	console string
	// wall is QEMU's launch to its exit.
	wall time.Duration
}

// run starts virtiofsd on g.dir, boots the guest against it, and waits for
// QEMU to exit and virtiofsd to follow. Both are started and reaped through
// the reaper; on any failure both are killed and reaped before the test
// fails.
func (g virtiofsGuest) run(t testing.TB) virtiofsRun {
	t.Helper()
	state := shortTempDir(t)
	sock := filepath.Join(state, "vfs.sock")
	var fsdErr lockedBuffer
	args := []string{"--socket-path=" + sock, "-o", "source=" + g.dir}
	if g.cache != "" {
		args = append(args, "-o", "cache="+g.cache)
	}
	fsd := exec.Command(virtiofsdPath, args...)
	fsd.Stderr = &fsdErr
	fp, err := reaper.Default().Start(fsd)
	if err != nil {
		t.Fatalf("start virtiofsd: %v", err)
	}
	defer stopProcess(t, "virtiofsd", fp, sock)
	if err := waitSocket(fp, sock, 10*time.Second); err != nil {
		t.Fatalf("virtiofsd: %v: %s", err, fsdErr.String())
	}

	qemu, err := vmm.FindQEMU("")
	if err != nil {
		t.Fatal(err)
	}
	var console, qemuErr lockedBuffer
	q := exec.Command(qemu, g.qemuArgs(sock)...)
	q.Stdout, q.Stderr = &console, &qemuErr
	began := time.Now()
	qp, err := reaper.Default().Start(q)
	if err != nil {
		t.Fatalf("start %s: %v", qemu, err)
	}
	defer stopProcess(t, "qemu", qp, sock)
	ctx, cancel := context.WithTimeout(context.Background(), virtiofsGuestTimeout)
	defer cancel()
	e, err := qp.Wait(ctx)
	wall := time.Since(began)
	if err != nil {
		t.Fatalf("virtio-fs guest did not finish: %v\nconsole: %s\nqemu: %s\nvfsd: %s", err, clipStr(console.String()), qemuErr.String(), clipStr(fsdErr.String()))
	}
	if e.Status != 0 {
		t.Fatalf("qemu: %v: %s\nconsole: %s", e, qemuErr.String(), clipStr(console.String()))
	}
	// virtiofsd ends by itself once QEMU closes the vhost-user socket.
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if e, err := fp.Wait(ctx); err != nil || e.Status != 0 {
		t.Fatalf("virtiofsd after the guest: %v %v: %s", e, err, fsdErr.String())
	}
	return virtiofsRun{console: console.String(), wall: wall}
}

// qemuArgs is boxlite's microvm command line (pkg/vmm qemuArgs) with the 9p
// share, balloon and agent port replaced by one vhost-user-fs device. The
// guest RAM is a shared memfd (virtiofsd maps it), and virtio-mmio runs in
// modern mode: libvhost-user refuses legacy devices ("virtio legacy devices
// aren't supported by libvhost-user"), QEMU's default for virtio-mmio.
func (g virtiofsGuest) qemuArgs(sock string) []string {
	args := []string{
		"-M", "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on,memory-backend=mem",
		"-global", "virtio-mmio.force-legacy=false",
	}
	if g.accel == vmm.AccelKVM {
		args = append(args, "-accel", "kvm", "-cpu", "host,-arch-capabilities")
	} else {
		args = append(args, "-accel", "tcg", "-cpu", "max")
	}
	return append(args,
		"-m", strconv.Itoa(g.memoryMiB),
		"-smp", strconv.Itoa(g.vcpus),
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", g.memoryMiB),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
		"-kernel", kernelPath,
		"-initrd", g.initrd,
		"-append", "console=ttyS0 reboot=t panic=-1 quiet",
		"-chardev", "socket,id=vfs,path="+sock,
		"-device", "vhost-user-fs-device,chardev=vfs,tag="+virtiofsTag,
	)
}

// waitSocket waits until path exists or p exits. It does not dial the
// socket: virtiofsd serves the first connection only.
func waitSocket(p *reaper.Process, path string, bound time.Duration) error {
	deadline := time.After(bound)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-p.Done():
			e, _ := p.Exit()
			return fmt.Errorf("exited (%v) before creating %s", e, path)
		case <-deadline:
			return fmt.Errorf("no socket %s after %v", path, bound)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// stopProcess kills p unless it has already been reaped, reaps it, and
// waits until no child of the test whose command line names mark is left
// (virtiofsd's sandbox child reparents to the test, a subreaper, when its
// parent dies first).
func stopProcess(t testing.TB, what string, p *reaper.Process, mark string) {
	t.Helper()
	if err := p.Signal(syscall.SIGKILL); err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := p.Wait(ctx); err != nil {
			t.Errorf("leak: %s pid %d not reaped after SIGKILL: %v", what, p.Pid(), err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []int
		for _, pid := range reaper.Children(os.Getpid()) {
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err == nil && bytes.Contains(cmdline, []byte(mark)) {
				left = append(left, pid)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("leak: children %v of %s still alive", left, what)
			for _, pid := range left {
				if id, err := reaper.ReadIdentity(pid); err == nil {
					id.Signal(unix.SIGKILL)
				}
			}
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
