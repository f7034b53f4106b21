package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/boxlite/boxlite/pkg/vmm"
)

// checkReport is what boxlite check found: one line per fact, and the
// problems that keep a box from running here, each with its fix.
type checkReport struct {
	lines    [][2]string
	problems []string
}

func (r *checkReport) fact(key, format string, args ...any) {
	r.lines = append(r.lines, [2]string{key, fmt.Sprintf(format, args...)})
}

func (r *checkReport) problem(err error) { r.problems = append(r.problems, err.Error()) }

func (r *checkReport) print(w io.Writer) {
	for _, l := range r.lines {
		fmt.Fprintf(w, "%-10s %s\n", l[0], l[1])
	}
}

// runCheck reports the QEMU binary, /dev/kvm, the accelerator and the guest
// images, and fails with one line per problem when a box cannot run here.
func runCheck(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "check", "check [--kernel FILE] [--initrd FILE] [--accel auto|kvm|tcg] [--qemu BINARY]")
	kernel := fs.String("kernel", "", "guest kernel (default: $BOXLITE_KERNEL, vmlinux next to boxlite, ../share/boxlite from it, /usr/local/share/boxlite, /usr/share/boxlite)")
	initrd := fs.String("initrd", "", "guest initramfs (default: $BOXLITE_INITRD, initramfs.cpio in the same places)")
	accel := fs.String("accel", string(vmm.AccelAuto), "accelerator to check: auto, kvm or tcg")
	qemu := fs.String("qemu", "", "QEMU binary (default: "+vmm.QEMUBinaryName+" from PATH)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	want, err := vmm.ParseAccel(*accel)
	if err != nil || fs.NArg() > 0 {
		if err != nil {
			fmt.Fprintf(env.stderr, "boxlite check: %v\n", err)
		}
		fs.Usage()
		return errUsage
	}
	var r checkReport
	checkQEMU(ctx, &r, *qemu)
	checkAccel(&r, want)
	checkImage(&r, "kernel", *kernel, vmm.FindKernel)
	checkImage(&r, "initramfs", *initrd, vmm.FindInitrd)
	r.print(env.stdout)
	if len(r.problems) == 0 {
		fmt.Fprintln(env.stdout, "ok: boxes can run here")
		return nil
	}
	for _, p := range r.problems {
		fmt.Fprintf(env.stderr, "boxlite check: %s\n", p)
	}
	return errReported
}

func checkQEMU(ctx context.Context, r *checkReport, bin string) {
	path, err := vmm.FindQEMU(bin)
	if err != nil {
		r.fact("qemu", "not found")
		r.problem(err)
		return
	}
	version, err := vmm.QEMUVersion(ctx, path)
	if err != nil {
		r.fact("qemu", "%s (does not run)", path)
		r.problem(fmt.Errorf("%w: run make setup", err))
		return
	}
	r.fact("qemu", "%s (%s)", path, version)
	if err := vmm.CheckSandbox(ctx, path); err != nil {
		r.fact("vmm", "QEMU cannot apply its seccomp filter")
		r.problem(fmt.Errorf("%w: a QEMU built with seccomp is needed (Debian's is)", err))
		return
	}
	// What every VMM gets (pkg/vmm): docs/design.md "A confined VMM".
	r.fact("vmm", "confined: seccomp filter (-sandbox %s), chroot into an empty read-only root, QMP and agent sockets 0600 passed as descriptors; runs as root (the 9p share needs it)", vmm.SeccompSandbox)
	if desc, err := vmm.CheckCgroup(); err != nil {
		r.fact("vmm cgroup", "none: %v", err)
		r.problem(fmt.Errorf("a VMM cannot get a cgroup of its own (%w): run as root on a host with the memory and pids controllers", err))
	} else {
		r.fact("vmm cgroup", "%s", desc)
	}
}

func checkAccel(r *checkReport, want vmm.Accel) {
	host := vmm.ProbeHost()
	dev := host.KVMDevice()
	if host.PVM {
		dev += ", provided by kvm_pvm"
	}
	r.fact("/dev/kvm", "%s", dev)
	switch usable, why := host.KVMUsable(); {
	case usable:
		r.fact("kvm", "can run the guest (%s)", why)
	case host.PVM:
		r.fact("kvm", "PVM host: KVM cannot run ordinary guests")
	default:
		r.fact("kvm", "cannot run the guest: %s", why)
	}
	accel, why, err := vmm.DetectAccel(want, host)
	if err != nil {
		r.fact("accel", "%s: unavailable", want)
		r.problem(fmt.Errorf("%w: use --accel auto or tcg", err))
		return
	}
	r.fact("accel", "%s: %s", accel, why)
}

func checkImage(r *checkReport, what, path string, find func(string) (string, error)) {
	p, err := find(path)
	if err != nil {
		r.fact(what, "missing")
		r.problem(err)
		return
	}
	st, err := os.Stat(p)
	if err != nil {
		r.fact(what, "%s: %v", p, err)
		r.problem(err)
		return
	}
	r.fact(what, "%s (%.1f MiB)", p, float64(st.Size())/(1<<20))
}
