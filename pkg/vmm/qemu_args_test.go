package vmm

import (
	"slices"
	"strings"
	"testing"
)

func argsConfig() *Config {
	return &Config{
		Kernel: "/k/vmlinux", Initrd: "/k/initramfs.cpio", Share: "/b/rootfs", StateDir: "/s",
		VCPUs: 1, MemoryMiB: 256,
	}
}

func TestQEMUArgsTCG(t *testing.T) {
	got := qemuArgs(argsConfig(), AccelTCG, launchFDs{qmp: 3, agent: 4})
	want := []string{
		"-M", "microvm,acpi=off,x-option-roms=off,isa-serial=on,pit=on,rtc=on",
		"-accel", "tcg,tb-size=256", "-cpu", "max",
		"-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
		"-kernel", "/k/vmlinux", "-initrd", "/k/initramfs.cpio",
		"-append", "console=ttyS0 reboot=t panic=-1 quiet",
		"-fsdev", "local,id=fs0,path=/b/rootfs,security_model=none,multidevs=remap",
		"-device", "virtio-9p-device,fsdev=fs0,mount_tag=share",
		"-device", "virtio-balloon-device,free-page-reporting=on",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=agent",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	}
	if !slices.Equal(got, want) {
		t.Errorf("qemuArgs() =\n%q\nwant\n%q", got, want)
	}
}

// flagValues returns the values following each occurrence of flag.
func flagValues(args []string, flag string) []string {
	var vals []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			vals = append(vals, args[i+1])
		}
	}
	return vals
}

func TestQEMUArgs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edit  func(*Config)
		accel Accel
		flag  string
		want  []string
	}{
		{name: "kvm uses the host cpu without arch-capabilities", accel: AccelKVM, flag: "-cpu", want: []string{"host,-arch-capabilities"}},
		{name: "kvm accelerator", accel: AccelKVM, flag: "-accel", want: []string{"kvm"}},
		{name: "memory", edit: func(c *Config) { c.MemoryMiB = 1024 }, flag: "-m", want: []string{"1024"}},
		{name: "vcpus", edit: func(c *Config) { c.VCPUs = 2 }, flag: "-smp", want: []string{"2"}},
		{name: "extra kernel args are appended", edit: func(c *Config) { c.KernelArgs = []string{"boxlite.debug=1", "init=/sbin/agent"} },
			flag: "-append", want: []string{"console=ttyS0 reboot=t panic=-1 quiet boxlite.debug=1 init=/sbin/agent"}},
		{name: "commas in the share are doubled", edit: func(c *Config) { c.Share = "/b/a,b,,c" },
			flag: "-fsdev", want: []string{"local,id=fs0,path=/b/a,,b,,,,c,security_model=none,multidevs=remap"}},
		{name: "kernel paths are passed verbatim", edit: func(c *Config) { c.Kernel, c.Initrd = "/k,1/vmlinux", "/k,1/i" },
			flag: "-kernel", want: []string{"/k,1/vmlinux"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := argsConfig()
			if tc.edit != nil {
				tc.edit(c)
			}
			accel := tc.accel
			if accel == "" {
				accel = AccelTCG
			}
			got := flagValues(qemuArgs(c, accel, launchFDs{qmp: 3, agent: 4}), tc.flag)
			if !slices.Equal(got, tc.want) {
				t.Errorf("%s = %q, want %q", tc.flag, got, tc.want)
			}
		})
	}
}

func TestQEMUArgsPassSocketsAsDescriptors(t *testing.T) {
	args := strings.Join(qemuArgs(argsConfig(), AccelTCG, launchFDs{qmp: 7, agent: 9}), " ")
	for _, want := range []string{"socket,id=qmp,fd=7,", "socket,id=agent,fd=9,"} {
		if !strings.Contains(args, want) {
			t.Errorf("args %q lack %q", args, want)
		}
	}
	if strings.Contains(args, "path=/s") {
		t.Errorf("args %q name a socket path: paths must not go through QEMU's option parser", args)
	}
}
