package shim

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/vmm"
)

// Annotations a box's OCI spec may carry to tune its VM.
const (
	// AnnotationVCPUs sets the VM's virtual CPUs (1-64).
	AnnotationVCPUs = "io.boxlite.vcpus"
	// AnnotationMemory sets the VM's memory in MiB (at least 64).
	AnnotationMemory = "io.boxlite.memory_mib"
	// AnnotationAccel selects the accelerator: auto, kvm or tcg.
	AnnotationAccel = "io.boxlite.accel"
	// AnnotationKernel and AnnotationInitrd override the guest images.
	AnnotationKernel = "io.boxlite.kernel"
	AnnotationInitrd = "io.boxlite.initrd"
	// AnnotationBootTimeout bounds boot to agent-ready, as a Go duration.
	AnnotationBootTimeout = "io.boxlite.boot_timeout"
)

// stateRoot holds one short directory per box for the VMM's sockets, console
// log and pid file: bundle paths can be longer than a unix socket path allows.
var stateRoot = "/run/boxlite/shim"

// boxStateDir is the VM state directory of box id in namespace ns. The
// delete action derives the same path from the same inputs.
func boxStateDir(ns, id string) string {
	sum := sha256.Sum256([]byte(ns + "/" + id))
	return filepath.Join(stateRoot, hex.EncodeToString(sum[:8]))
}

// vmOptions are the VM settings of one box.
type vmOptions struct {
	vcpus, memoryMiB int
	accel            vmm.Accel
	kernel, initrd   string
	bootTimeout      time.Duration
}

// parseVMOptions reads the io.boxlite.* annotations of spec; a bad value is
// an InvalidArgument error naming the annotation.
func parseVMOptions(spec *specs.Spec) (vmOptions, error) {
	var o vmOptions
	a := spec.Annotations
	bad := func(key, why string) error {
		return fmt.Errorf("annotation %s=%q: %s: %w", key, a[key], why, errdefs.ErrInvalidArgument)
	}
	if v, ok := a[AnnotationVCPUs]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 64 {
			return o, bad(AnnotationVCPUs, "want 1 to 64")
		}
		o.vcpus = n
	}
	if v, ok := a[AnnotationMemory]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 64 || n > 1<<20 {
			return o, bad(AnnotationMemory, "want MiB from 64")
		}
		o.memoryMiB = n
	}
	if v, ok := a[AnnotationAccel]; ok {
		acc, err := vmm.ParseAccel(v)
		if err != nil {
			return o, bad(AnnotationAccel, "want auto, kvm or tcg")
		}
		o.accel = acc
	}
	o.kernel, o.initrd = a[AnnotationKernel], a[AnnotationInitrd]
	if v, ok := a[AnnotationBootTimeout]; ok {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return o, bad(AnnotationBootTimeout, "want a positive duration such as 60s")
		}
		o.bootTimeout = d
	}
	return o, nil
}
