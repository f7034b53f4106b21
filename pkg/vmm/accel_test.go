package vmm

import (
	"errors"
	"io/fs"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestDetectAccel(t *testing.T) {
	const (
		vmxInfo  = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
		svmInfo  = "processor\t: 0\nflags\t\t: fpu svm lm\n"
		noneInfo = "processor\t: 0\nflags\t\t: fpu vme hypervisor\n"
	)
	for _, tc := range []struct {
		name       string
		want       Accel
		host       Host
		accel      Accel
		reason     string
		errIs      error
		errContain string
	}{
		{name: "auto uses kvm with vmx", want: AccelAuto, host: Host{CPUInfo: []byte(vmxInfo)}, accel: AccelKVM, reason: "vmx"},
		{name: "auto uses kvm with svm", want: AccelAuto, host: Host{CPUInfo: []byte(svmInfo)}, accel: AccelKVM, reason: "svm"},
		{name: "empty means auto", want: "", host: Host{CPUInfo: []byte(vmxInfo)}, accel: AccelKVM},
		{name: "auto falls back without kvm device", want: AccelAuto,
			host:  Host{CPUInfo: []byte(vmxInfo), KVMErr: &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrNotExist}},
			accel: AccelTCG, reason: "/dev/kvm: missing, using TCG"},
		{name: "auto falls back on a PVM host", want: AccelAuto, host: Host{CPUInfo: []byte(noneInfo), PVM: true},
			accel: AccelTCG, reason: "/dev/kvm is provided by kvm_pvm (PVM host): ordinary guests cannot run under it, using TCG"},
		{name: "PVM wins over cpu flags", want: AccelAuto, host: Host{CPUInfo: []byte(vmxInfo), PVM: true},
			accel: AccelTCG, reason: "kvm_pvm"},
		{name: "auto falls back without vmx or svm", want: AccelAuto, host: Host{CPUInfo: []byte(noneInfo)},
			accel: AccelTCG, reason: "no vmx/svm in /proc/cpuinfo"},
		{name: "auto falls back when cpuinfo is unreadable", want: AccelAuto, host: Host{},
			accel: AccelTCG, reason: "no vmx/svm"},
		{name: "auto falls back when kvm is not accessible", want: AccelAuto,
			host:  Host{CPUInfo: []byte(vmxInfo), KVMErr: &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrPermission}},
			accel: AccelTCG, reason: "/dev/kvm: permission denied"},
		{name: "forced kvm when usable", want: AccelKVM, host: Host{CPUInfo: []byte(svmInfo)}, accel: AccelKVM},
		{name: "forced kvm on a PVM host fails", want: AccelKVM, host: Host{CPUInfo: []byte(vmxInfo), PVM: true},
			errIs: errdefs.ErrFailedPrecondition, errContain: "accelerator kvm requested but KVM cannot run the guest: /dev/kvm is provided by kvm_pvm"},
		{name: "forced kvm without flags fails", want: AccelKVM, host: Host{CPUInfo: []byte(noneInfo)},
			errIs: errdefs.ErrFailedPrecondition, errContain: "no vmx/svm"},
		{name: "forced tcg ignores the host", want: AccelTCG, host: Host{CPUInfo: []byte(vmxInfo)}, accel: AccelTCG},
		{name: "unknown accelerator", want: "hvf", errIs: errdefs.ErrInvalidArgument, errContain: `"hvf"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			accel, reason, err := DetectAccel(tc.want, tc.host)
			if tc.errIs != nil {
				if !errors.Is(err, tc.errIs) || !strings.Contains(err.Error(), tc.errContain) {
					t.Fatalf("DetectAccel() error = %v, want %v containing %q", err, tc.errIs, tc.errContain)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if accel != tc.accel || !strings.Contains(reason, tc.reason) {
				t.Errorf("DetectAccel() = %q, %q; want %q, reason containing %q", accel, reason, tc.accel, tc.reason)
			}
		})
	}
}

func TestParseAccel(t *testing.T) {
	for in, want := range map[string]Accel{"": AccelAuto, "auto": AccelAuto, "kvm": AccelKVM, "tcg": AccelTCG} {
		if got, err := ParseAccel(in); err != nil || got != want {
			t.Errorf("ParseAccel(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseAccel("KVM"); !errdefs.IsInvalidArgument(err) {
		t.Errorf("ParseAccel(KVM) error = %v, want invalid argument", err)
	}
}

func TestKVMDeviceDescribesOpenErrors(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, "read-write"},
		{fs.ErrNotExist, "missing"},
		{fs.ErrPermission, "permission denied"},
		{errors.New("device busy"), "device busy"},
	} {
		if got := (Host{KVMErr: tc.err}).KVMDevice(); got != tc.want {
			t.Errorf("KVMDevice() with %v = %q, want %q", tc.err, got, tc.want)
		}
	}
}
