package vmm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
	"unicode"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Defaults applied by NewQEMU to zero Config fields.
const (
	DefaultVCPUs         = 1
	DefaultMemoryMiB     = 256
	DefaultConsoleLogMax = 1 << 20
	// DefaultStopTimeout bounds Stop when its ctx has no deadline.
	DefaultStopTimeout = 10 * time.Second
	// QEMUBinaryName is looked up in PATH when Config.QEMUBinary is empty.
	QEMUBinaryName = "qemu-system-x86_64"
)

// Limits NewQEMU enforces.
const (
	maxVCPUs         = 64
	minMemoryMiB     = 32
	minConsoleLogMax = 4 << 10
	// sunPathMax is the size of sockaddr_un.sun_path, NUL included.
	sunPathMax = 108
)

// Names of the files QEMU keeps in Config.StateDir.
const (
	PidFileName     = "vmm.pid"
	QMPSocketName   = "qmp.sock"
	AgentSocketName = "agent.sock"
	ConsoleLogName  = "console.log"
)

// Config describes one VM. Zero fields get the defaults documented on them.
type Config struct {
	// Kernel is the guest kernel (an ELF vmlinux). Empty: found by
	// FindKernel.
	Kernel string
	// Initrd is the guest initramfs. Empty: found by FindInitrd.
	Initrd string
	// Share is a host directory shared with the guest over 9p with mount
	// tag ShareTag: the box's rootfs and volume sources live under it.
	// Required.
	Share string
	// NICs are the VM's network devices, in order (at most maxNICs).
	NICs []NIC
	// NetNS, when set, is an open network namespace (a file of nsfs, such
	// as /proc/<pid>/ns/net or /var/run/netns/<name>) that QEMU is started
	// in, so that the box's network namespace is the VMM's. nil: ours.
	NetNS *os.File
	// StateDir is an existing directory for the sockets, console log and
	// pid file. Required; it must be short enough for unix socket paths.
	StateDir string
	// VCPUs is the number of virtual CPUs (default 1).
	VCPUs int
	// MemoryMiB is the guest RAM in MiB (default 256).
	MemoryMiB int
	// Accel selects the accelerator (default auto).
	Accel Accel
	// KernelArgs are extra kernel command line parameters, one per entry.
	KernelArgs []string
	// QEMUBinary is the monitor executable (default: qemu-system-x86_64
	// from PATH).
	QEMUBinary string
	// ConsoleLogMax caps console.log in bytes; when full it is rotated to
	// console.log.1 (default 1 MiB).
	ConsoleLogMax int64
	// Cgroup, when set, is the name of a cgroup of the monitor's own,
	// made under ours (cgroup.go) with a memory limit of the VM's RAM plus
	// QEMU's overhead and a pids limit, and removed when the monitor
	// exits. It must be unique among the VMs run by processes sharing our
	// cgroup. Empty: the monitor runs in our cgroup.
	Cgroup string
	// Templates, when set, restores the VM from the template of its shape
	// instead of booting it, building the template on first use. Any
	// problem with a template falls back to a cold boot.
	Templates *Templates
	// template is set on the VMs that build or clone a template.
	template *templateUse
	// host overrides ProbeHost for tests.
	host *Host
	// clockArgs are the kernel parameters that keep the guest's clock
	// right under the chosen accelerator (guestClockArgs); set by NewQEMU.
	clockArgs []string
}

// classify attaches an errdefs class to err without changing its message.
func classify(class, err error) error { return errclass.Wrap(class, err) }

// validate fills defaults and checks every field, returning the first
// problem with a message that says how to fix it.
func (c *Config) validate() error {
	if err := c.validateFiles(); err != nil {
		return err
	}
	if err := c.validateStateDir(); err != nil {
		return err
	}
	if err := c.validateSizes(); err != nil {
		return err
	}
	if err := validateNICs(c.NICs); err != nil {
		return err
	}
	if c.Cgroup != "" && (strings.ContainsAny(c.Cgroup, "/") || c.Cgroup == "." || c.Cgroup == ".." ||
		strings.IndexFunc(c.Cgroup, unicode.IsControl) >= 0 || len(c.Cgroup) > 200) {
		return invalid("cgroup name %q: one path element without control characters, at most 200 bytes", c.Cgroup)
	}
	for _, a := range c.KernelArgs {
		if a == "" || strings.IndexFunc(a, unicode.IsSpace) >= 0 || strings.IndexFunc(a, unicode.IsControl) >= 0 {
			return invalid("kernel argument %q: one parameter per entry, without spaces", a)
		}
	}
	if n := len(kernelCmdline(c.KernelArgs)); n > maxKernelCmdline-clockArgsMax {
		return invalid("kernel command line is %d bytes: at most %d fit", n, maxKernelCmdline-clockArgsMax)
	}
	bin, err := FindQEMU(c.QEMUBinary)
	if err != nil {
		return err
	}
	c.QEMUBinary = bin
	return nil
}

func invalid(format string, args ...any) error {
	return errclass.Errorf(errdefs.ErrInvalidArgument, format, args...)
}

func (c *Config) validateFiles() error {
	var err error
	if c.Kernel, err = FindKernel(c.Kernel); err != nil {
		return err
	}
	if c.Initrd, err = FindInitrd(c.Initrd); err != nil {
		return err
	}
	if c.Share == "" {
		return invalid("share: a directory to share with the guest is required")
	}
	if c.Share, err = filepath.Abs(c.Share); err != nil {
		return invalid("share %s: %w", c.Share, err)
	}
	st, err := os.Stat(c.Share)
	if err != nil {
		return classify(errdefs.ErrNotFound, fmt.Errorf("share %s: %w", c.Share, err))
	}
	if !st.IsDir() {
		return invalid("share %s is not a directory", c.Share)
	}
	return nil
}

// checkFile checks that path is a readable regular file and returns it
// absolute; a missing file's error ends with fix.
func checkFile(what, path, fix string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", invalid("%s %s: %w", what, path, err)
	}
	st, err := os.Stat(abs)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", classify(errdefs.ErrNotFound, fmt.Errorf("%s %s missing: %s", what, abs, fix))
	case err != nil:
		return "", classify(errdefs.ErrFailedPrecondition, fmt.Errorf("%s %s: %w", what, abs, err))
	case !st.Mode().IsRegular():
		return "", invalid("%s %s is not a regular file: %s", what, abs, fix)
	}
	return abs, nil
}

func (c *Config) validateStateDir() error {
	if c.StateDir == "" {
		return invalid("state dir is required")
	}
	dir, err := filepath.Abs(c.StateDir)
	if err != nil {
		return invalid("state dir %s: %w", c.StateDir, err)
	}
	c.StateDir = dir
	st, err := os.Stat(dir)
	if err != nil {
		return classify(errdefs.ErrNotFound, fmt.Errorf("state dir %s: %w", dir, err))
	}
	if !st.IsDir() {
		return invalid("state dir %s is not a directory", dir)
	}
	for _, name := range []string{QMPSocketName, AgentSocketName} {
		if p := filepath.Join(dir, name); len(p) >= sunPathMax {
			return invalid("state dir %s is too long: socket path %s is %d bytes, unix sockets allow %d",
				dir, p, len(p), sunPathMax-1)
		}
	}
	return nil
}

func (c *Config) validateSizes() error {
	switch {
	case c.VCPUs == 0:
		c.VCPUs = DefaultVCPUs
	case c.VCPUs < 0 || c.VCPUs > maxVCPUs:
		return invalid("vcpus %d: want 1 to %d", c.VCPUs, maxVCPUs)
	}
	switch {
	case c.MemoryMiB == 0:
		c.MemoryMiB = DefaultMemoryMiB
	case c.MemoryMiB < minMemoryMiB:
		return invalid("memory %d MiB: want at least %d MiB", c.MemoryMiB, minMemoryMiB)
	}
	switch {
	case c.ConsoleLogMax == 0:
		c.ConsoleLogMax = DefaultConsoleLogMax
	case c.ConsoleLogMax < minConsoleLogMax:
		return invalid("console log max %d bytes: want at least %d", c.ConsoleLogMax, minConsoleLogMax)
	}
	a, err := ParseAccel(string(c.Accel))
	c.Accel = a
	return err
}

// FindQEMU resolves the monitor binary: bin if set (a path or a name looked
// up in PATH), else qemu-system-x86_64 from PATH.
func FindQEMU(bin string) (string, error) {
	if bin == "" {
		p, err := exec.LookPath(QEMUBinaryName)
		if err != nil {
			return "", classify(errdefs.ErrNotFound, fmt.Errorf("%s not found: run make setup", QEMUBinaryName))
		}
		return p, nil
	}
	p, err := exec.LookPath(bin)
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, exec.ErrNotFound):
		return "", classify(errdefs.ErrNotFound, fmt.Errorf("qemu binary %s not found: run make setup", bin))
	case err != nil:
		return "", classify(errdefs.ErrFailedPrecondition, fmt.Errorf("qemu binary %s: %w", bin, err))
	}
	return p, nil
}
