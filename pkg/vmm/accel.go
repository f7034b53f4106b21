package vmm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Accel selects how the guest's CPU is run.
type Accel string

const (
	// AccelAuto uses KVM when it can run an ordinary guest, TCG otherwise.
	AccelAuto Accel = "auto"
	// AccelKVM requires hardware virtualization through /dev/kvm.
	AccelKVM Accel = "kvm"
	// AccelTCG uses QEMU's binary translator: slower, runs anywhere.
	AccelTCG Accel = "tcg"
)

// ParseAccel parses "auto", "kvm" or "tcg"; the empty string is AccelAuto.
func ParseAccel(s string) (Accel, error) {
	switch a := Accel(s); a {
	case "":
		return AccelAuto, nil
	case AccelAuto, AccelKVM, AccelTCG:
		return a, nil
	}
	return "", classify(errdefs.ErrInvalidArgument,
		fmt.Errorf("accelerator %q: want auto, kvm or tcg", s))
}

// Paths of the host facts accelerator detection reads.
const (
	kvmDevice    = "/dev/kvm"
	cpuInfoPath  = "/proc/cpuinfo"
	pvmModuleDir = "/sys/module/kvm_pvm"
)

// Host is what accelerator detection looks at. ProbeHost fills it from the
// running machine; tests build it by hand.
type Host struct {
	// CPUInfo is the content of /proc/cpuinfo (nil if it could not be read).
	CPUInfo []byte
	// KVMErr is the error opening /dev/kvm read-write; nil means it opened.
	KVMErr error
	// PVM says /dev/kvm is provided by the kvm_pvm module, which only runs
	// guests built for PVM.
	PVM bool
}

// ProbeHost reads the facts accelerator detection needs from this machine.
func ProbeHost() Host {
	var h Host
	h.CPUInfo, _ = os.ReadFile(cpuInfoPath)
	f, err := os.OpenFile(kvmDevice, os.O_RDWR, 0)
	if err == nil {
		f.Close()
	}
	h.KVMErr = err
	if st, err := os.Stat(pvmModuleDir); err == nil && st.IsDir() {
		h.PVM = true
	}
	return h
}

// VirtFlag returns "vmx" or "svm" when /proc/cpuinfo advertises hardware
// virtualization, "" otherwise.
func (h Host) VirtFlag() string {
	sc := bufio.NewScanner(bytes.NewReader(h.CPUInfo))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "flags" {
			continue
		}
		for _, f := range strings.Fields(val) {
			if f == "vmx" || f == "svm" {
				return f
			}
		}
	}
	return ""
}

// KVMDevice describes /dev/kvm in a few words: "read-write", "missing",
// "permission denied" or the open error.
func (h Host) KVMDevice() string {
	switch {
	case h.KVMErr == nil:
		return "read-write"
	case errors.Is(h.KVMErr, fs.ErrNotExist):
		return "missing"
	case errors.Is(h.KVMErr, fs.ErrPermission):
		return "permission denied"
	}
	return h.KVMErr.Error()
}

// KVMUsable reports whether KVM can run an ordinary (non-PVM) guest here,
// and if not, why.
func (h Host) KVMUsable() (bool, string) {
	switch {
	case h.KVMErr != nil:
		return false, kvmDevice + ": " + h.KVMDevice()
	case h.PVM:
		return false, kvmDevice + " is provided by kvm_pvm (PVM host): ordinary guests cannot run under it"
	}
	if flag := h.VirtFlag(); flag != "" {
		return true, kvmDevice + " is usable and the CPU has " + flag
	}
	return false, "no vmx/svm in " + cpuInfoPath
}

// DetectAccel resolves want against host. It returns the accelerator to use
// and why; forcing kvm where KVM cannot run the guest is an error.
func DetectAccel(want Accel, host Host) (Accel, string, error) {
	switch want {
	case AccelTCG:
		return AccelTCG, "tcg requested", nil
	case AccelKVM:
		ok, why := host.KVMUsable()
		if !ok {
			return "", why, classify(errdefs.ErrFailedPrecondition,
				fmt.Errorf("accelerator kvm requested but KVM cannot run the guest: %s", why))
		}
		return AccelKVM, "kvm requested: " + why, nil
	case AccelAuto, "":
		ok, why := host.KVMUsable()
		if ok {
			return AccelKVM, why, nil
		}
		return AccelTCG, why + ", using TCG", nil
	}
	_, err := ParseAccel(string(want))
	return "", "", err
}

// tcgWarning makes the "falling back to TCG" warning appear once per process.
var tcgWarning sync.Once

// warnTCG logs once per process that auto detection fell back to TCG.
func warnTCG(reason string) {
	tcgWarning.Do(func() {
		log.L.WithField("reason", reason).Warn("KVM cannot run the guest: VMs run under TCG (slow)")
	})
}
