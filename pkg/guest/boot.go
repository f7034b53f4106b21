package guest

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// fixRoot makes the initramfs a root the runtime can pivot_root away from:
// pivot_root(2) refuses the initramfs rootfs itself ("invalid argument").
// The rootfs is bind-mounted on a directory, that mount is moved over / and
// becomes our root.
func fixRoot() error {
	const dir = "/.root"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	steps := []struct {
		what string
		fn   func() error
	}{
		{"bind / on " + dir, func() error { return unix.Mount("/", dir, "", unix.MS_BIND|unix.MS_REC, "") }},
		{"chdir " + dir, func() error { return unix.Chdir(dir) }},
		{"move . to /", func() error { return unix.Mount(".", "/", "", unix.MS_MOVE, "") }},
		{"chroot .", func() error { return unix.Chroot(".") }},
		{"chdir /", func() error { return unix.Chdir("/") }},
	}
	for _, s := range steps {
		if err := s.fn(); err != nil {
			return fmt.Errorf("fix root: %s: %w", s.what, err)
		}
	}
	return nil
}

// mountSpec is one filesystem mounted at boot.
type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// bootMounts are the filesystems the agent and the runtime need, in order.
var bootMounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
}

// mountAll mounts bootMounts and adds the /dev links a system expects.
func mountAll() error {
	for _, m := range bootMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	links := [][2]string{
		{"pts/ptmx", "/dev/ptmx"},
		{"/proc/self/fd", "/dev/fd"},
		{"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"},
		{"/proc/self/fd/2", "/dev/stderr"},
	}
	for _, l := range links {
		_ = os.Remove(l[1])
		if err := os.Symlink(l[0], l[1]); err != nil {
			return err
		}
	}
	return nil
}

// openConsole makes /dev/console our stdin, stdout and stderr: when the
// initramfs has no console node, the kernel could not give init one.
func openConsole() error {
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("open /dev/console", err)
	}
	for i := 0; i < 3; i++ {
		if err := unix.Dup3(fd, i, 0); err != nil {
			return os.NewSyscallError("dup3", err)
		}
	}
	if fd > 2 {
		unix.Close(fd)
	}
	return nil
}

// enableControllers delegates the available controllers among memory,
// pids, cpu, io and cpuset to child cgroups (the containers').
func enableControllers(root string) {
	data, err := os.ReadFile(root + "/cgroup.controllers")
	if err != nil {
		log.L.WithError(err).Warn("read cgroup controllers")
		return
	}
	have := strings.Fields(string(data))
	for _, c := range []string{"cpuset", "cpu", "io", "memory", "pids"} {
		if !slices.Contains(have, c) {
			continue
		}
		if err := os.WriteFile(root+"/cgroup.subtree_control", []byte("+"+c), 0); err != nil {
			log.L.WithError(err).WithField("controller", c).Warn("enable cgroup controller")
		}
	}
}

// loopbackUp brings the loopback interface up (the kernel adds 127.0.0.1).
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return os.NewSyscallError("SIOCGIFFLAGS lo", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return os.NewSyscallError("SIOCSIFFLAGS lo", err)
	}
	return nil
}

// bootParams are the agent's kernel command line parameters.
type bootParams struct {
	// debug is boxlite.debug=1: log at debug level.
	debug bool
	// runtime is boxlite.runtime=: crun (default), runc or a path.
	runtime string
}

// parseCmdline reads the agent's parameters from a kernel command line.
func parseCmdline(cmdline string) bootParams {
	var p bootParams
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "boxlite.debug":
			p.debug = v == "1" || v == "true" || v == ""
		case "boxlite.runtime":
			p.runtime = v
		}
	}
	return p
}

// errNotPID1 is returned by Main outside a microVM.
var errNotPID1 = errors.New("boxlite-agent runs as PID 1 of a boxlite microVM")
