package vmm

import (
	"strconv"
	"strings"
)

// baseKernelArgs start every guest command line: the console on the ISA
// serial port, reboot by triple fault (with acpi=off QEMU otherwise takes
// seconds to exit after the guest reboots), reboot at once on panic (which
// -no-reboot turns into a QEMU exit), and a quiet boot.
var baseKernelArgs = []string{"console=ttyS0", "reboot=t", "panic=-1", "quiet"}

// maxKernelCmdline leaves room in x86's 2048-byte command line for the
// virtio_mmio.device= entries QEMU appends itself with acpi=off.
const maxKernelCmdline = 1536

// Names the guest sees: the 9p mount tag of Config.Share and the agent port.
const (
	ShareTag = "share"
	// AgentPortName is the virtio-serial port name the guest agent opens
	// (/sys/class/virtio-ports/*/name).
	AgentPortName = "agent"
)

// SeccompSandbox is QEMU's -sandbox argument: its seccomp filter with every
// optional deny list on.
const SeccompSandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// launchFDs are the child's descriptor numbers of the listening sockets
// passed to QEMU (ExtraFiles start at 3).
type launchFDs struct {
	qmp   int
	agent int
	// taps are the descriptors of the NICs' taps, by NIC index (-1 for a
	// NIC without one).
	taps []int
}

// qemuArgs builds the QEMU command line (without argv[0]) for a validated
// config. The console goes to QEMU's stdout; the QMP and agent sockets are
// listening sockets the caller already bound, passed as descriptors, so
// their paths never go through QEMU's option parser.
func qemuArgs(c *Config, accel Accel, fds launchFDs) []string {
	machine := "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on"
	// Free page reporting: the guest tells QEMU which pages it freed and
	// QEMU gives them back to the host, so the VMM's RSS falls after a
	// workload frees memory instead of staying at its peak. Not with a
	// template: QEMU 7.2 punches the freed pages out of the RAM file even
	// when it maps it privately, zeroing them in the template itself.
	balloon := "virtio-balloon-device,free-page-reporting=on"
	var args []string
	if m := c.template; m != nil {
		machine += ",memory-backend=mem"
		balloon = "virtio-balloon-device,free-page-reporting=off"
		args = append(args,
			"-object", "memory-backend-file,id=mem,size="+strconv.Itoa(c.MemoryMiB)+"M,mem-path="+escapeOpt(m.memory)+
				",share="+onOff(m.role == roleBuild))
		if m.role == roleClone {
			// The stream is loaded once x-ignore-shared is set (QMP:
			// QEMU 7.2 has no property for it).
			args = append(args, "-incoming", "defer")
		}
	}
	args = append([]string{"-M", machine}, args...)
	args = append(args, accelArgs(accel)...)
	args = append(args,
		"-m", strconv.Itoa(c.MemoryMiB),
		"-smp", strconv.Itoa(c.VCPUs),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// QEMU's seccomp filter: a guest that takes over QEMU cannot
		// use obsolete system calls, change its uid or gid, start a
		// process, or change scheduling and resource limits.
		"-sandbox", SeccompSandbox,
		// -nodefaults drops the default serial: put the console on stdout.
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
		"-kernel", c.Kernel,
		"-initrd", c.Initrd,
		"-append", kernelCmdline(append(append([]string(nil), c.clockArgs...), c.KernelArgs...)),
		// multidevs=remap: the share holds bind mounts of other file
		// systems (the rootfs, volumes), whose inode numbers would
		// otherwise collide in the guest.
		"-fsdev", "local,id=fs0,path="+escapeOpt(c.Share)+",security_model=none,multidevs=remap",
		"-device", "virtio-9p-device,fsdev=fs0,mount_tag="+ShareTag,
		"-device", balloon,
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,fd="+strconv.Itoa(fds.agent)+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+AgentPortName,
		"-chardev", "socket,id=qmp,fd="+strconv.Itoa(fds.qmp)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	)
	args = append(args, nicArgs(c.NICs, func(i int) int { return fds.taps[i] })...)
	return args
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// accelArgs selects the accelerator and a CPU model that works with it.
func accelArgs(a Accel) []string {
	if a == AccelKVM {
		// Plain "host" aborts with "failed to set MSR 0x10a" on some hosts.
		return []string{"-accel", "kvm", "-cpu", "host,-arch-capabilities"}
	}
	return []string{"-accel", "tcg,tb-size=" + strconv.Itoa(tcgCodeCacheMiB), "-cpu", "max"}
}

// kernelCmdline joins the base arguments and extra ones.
func kernelCmdline(extra []string) string {
	return strings.Join(append(append([]string(nil), baseKernelArgs...), extra...), " ")
}

// escapeOpt escapes a value for QEMU's "key=value,..." option syntax, in
// which a literal comma is written as two.
func escapeOpt(v string) string {
	return strings.ReplaceAll(v, ",", ",,")
}
