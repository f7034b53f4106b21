package shim

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/health"
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
	// AnnotationTemplates turns VM templates on or off for the box
	// ("true" or "false"; on unless $BOXLITE_TEMPLATES is "off").
	AnnotationTemplates = "io.boxlite.templates"
)

// TemplatesEnv, set to "off" in the shim's environment (containerd's or the
// manager's), makes boxes boot cold unless their options turn templates on.
const TemplatesEnv = "BOXLITE_TEMPLATES"

// templateDir returns the directory of the VM templates
// ($BOXLITE_TEMPLATE_DIR, else vmm.DefaultTemplateDir).
var templateDir = vmm.TemplateDir

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
	// templates restores the VM from a template of its shape.
	templates bool
	// health configures the box's health check.
	health health.Options
}

// optionKeys maps runtime-option keys (containerd's runtime options file)
// to the annotation that sets the same thing per box.
var optionKeys = map[string]string{
	"vcpus":        AnnotationVCPUs,
	"memory_mib":   AnnotationMemory,
	"accel":        AnnotationAccel,
	"kernel":       AnnotationKernel,
	"initrd":       AnnotationInitrd,
	"boot_timeout": AnnotationBootTimeout,
	"templates":    AnnotationTemplates,

	"health_disabled":     health.AnnotationDisabled,
	"health_interval":     health.AnnotationInterval,
	"health_timeout":      health.AnnotationTimeout,
	"health_start_period": health.AnnotationStartPeriod,
	"health_retries":      health.AnnotationRetries,
}

// optionNames lists the runtime-option keys, for errors.
var optionNames = func() string {
	names := make([]string, 0, len(optionKeys))
	for k := range optionKeys {
		names = append(names, k)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}()

// parseVMOptions returns the box's VM settings: the runtime's options from
// containerd (defaults for every box of the runtime), overridden by the
// spec's io.boxlite.* annotations. A bad value is an InvalidArgument error
// naming the option or annotation.
func parseVMOptions(spec *specs.Spec, runtimeOpts *anypb.Any) (vmOptions, error) {
	o := vmOptions{health: health.DefaultOptions(), templates: os.Getenv(TemplatesEnv) != "off"}
	settings, _, err := decodeRuntimeOptions(runtimeOpts)
	if err != nil {
		return o, err
	}
	for _, key := range sortedKeys(settings) {
		if err := o.set(optionKeys[key], settings[key], "runtime option "+key); err != nil {
			return o, err
		}
	}
	o.fitResources(spec)
	for _, ann := range sortedKeys(spec.Annotations) {
		if _, ok := annotationKnown[ann]; ok {
			if err := o.set(ann, spec.Annotations[ann], "annotation "+ann); err != nil {
				return o, err
			}
		}
	}
	return o, nil
}

// guestOverheadMiB is the memory the guest kernel and agent need above a
// container's memory limit.
const guestOverheadMiB = 64

// maxVCPUs is the most vCPUs a VM gets.
const maxVCPUs = 64

// fitResources grows the VM so the container's limits can be reached
// inside it, as Kata does: memory to the limit plus guestOverheadMiB, vCPUs
// to the CPU quota rounded up. A VM is never made smaller than its default
// (the runtime option, else pkg/vmm's), and the io.boxlite.vcpus and
// io.boxlite.memory_mib annotations, applied after, still set exact sizes.
// Without this a container limited to 1 GiB (ctr --memory-limit, nerdctl
// --memory, a Kubernetes limit) would be OOM-killed near 200 MiB.
//
// A pod's VM is sized the same way from the pod's totals, which CRI puts on
// the sandbox container's spec as annotations (the pause container's own
// limits are tiny): io.kubernetes.cri.sandbox-memory (bytes) and
// -cpu-quota / -cpu-period (µs).
func (o *vmOptions) fitResources(spec *specs.Spec) {
	var memLimit, quota int64
	var period uint64
	if spec.Linux != nil && spec.Linux.Resources != nil {
		res := spec.Linux.Resources
		if m := res.Memory; m != nil && m.Limit != nil {
			memLimit = *m.Limit
		}
		if c := res.CPU; c != nil && c.Quota != nil && c.Period != nil {
			quota, period = *c.Quota, *c.Period
		}
	}
	if spec.Annotations[annotationContainerType] == containerTypeSandbox {
		if v, err := strconv.ParseInt(spec.Annotations[annotationSandboxMemory], 10, 64); err == nil && v > 0 {
			memLimit = max(memLimit, v)
		}
		q, qerr := strconv.ParseInt(spec.Annotations[annotationSandboxCPUQuota], 10, 64)
		p, perr := strconv.ParseUint(spec.Annotations[annotationSandboxCPUPeriod], 10, 64)
		if qerr == nil && perr == nil && q > 0 && p > 0 && (period == 0 || float64(q)/float64(p) > float64(quota)/float64(period)) {
			quota, period = q, p
		}
	}
	if memLimit > 0 {
		limitMiB := (memLimit + (1 << 20) - 1) >> 20
		def := int64(cmp.Or(o.memoryMiB, vmm.DefaultMemoryMiB))
		if need := limitMiB + guestOverheadMiB; need > def && need <= 1<<20 {
			o.memoryMiB = int(need)
		}
	}
	if quota > 0 && period > 0 {
		need := int((uint64(quota) + period - 1) / period)
		if need > cmp.Or(o.vcpus, vmm.DefaultVCPUs) {
			o.vcpus = min(need, maxVCPUs)
		}
	}
}

// CRI's annotations on a pod's sandbox container that give the pod's
// resource totals.
const (
	annotationSandboxMemory    = "io.kubernetes.cri.sandbox-memory"
	annotationSandboxCPUQuota  = "io.kubernetes.cri.sandbox-cpu-quota"
	annotationSandboxCPUPeriod = "io.kubernetes.cri.sandbox-cpu-period"
)

// annotationKnown is the set of io.boxlite.* annotations.
var annotationKnown = func() map[string]struct{} {
	m := map[string]struct{}{}
	for _, a := range optionKeys {
		m[a] = struct{}{}
	}
	return m
}()

// set applies one setting named by its annotation; what names its source.
func (o *vmOptions) set(ann, v, what string) error {
	bad := func(why string) error {
		return fmt.Errorf("%s=%q: %s: %w", what, v, why, errdefs.ErrInvalidArgument)
	}
	switch ann {
	case AnnotationVCPUs:
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 64 {
			return bad("want 1 to 64")
		}
		o.vcpus = n
	case AnnotationMemory:
		n, err := strconv.Atoi(v)
		if err != nil || n < 64 || n > 1<<20 {
			return bad("want MiB from 64")
		}
		o.memoryMiB = n
	case AnnotationAccel:
		acc, err := vmm.ParseAccel(v)
		if err != nil {
			return bad("want auto, kvm or tcg")
		}
		o.accel = acc
	case AnnotationKernel:
		o.kernel = v
	case AnnotationInitrd:
		o.initrd = v
	case health.AnnotationDisabled, health.AnnotationInterval, health.AnnotationTimeout,
		health.AnnotationStartPeriod, health.AnnotationRetries:
		return o.health.Set(ann, v, what)
	case AnnotationTemplates:
		b, err := strconv.ParseBool(v)
		if err != nil {
			return bad("want true or false")
		}
		o.templates = b
	case AnnotationBootTimeout:
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return bad("want a positive duration such as 60s")
		}
		o.bootTimeout = d
	}
	return nil
}

// decodeRuntimeOptions reads containerd's runtime options for this runtime:
// none; runtimeoptions.v1.Options whose ConfigBody or ConfigPath holds a
// TOML table of the keys in optionKeys (returned as settings); or runc's
// options type, which containerd's client helpers produce for any runtime
// (returned as runc, checked by checkRuncOptions). Any other options type
// and any unknown key are errors: settings are never silently dropped.
func decodeRuntimeOptions(a *anypb.Any) (settings map[string]string, runc *runcoptions.Options, err error) {
	if a == nil || (a.GetTypeUrl() == "" && len(a.GetValue()) == 0) {
		return nil, nil, nil
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return nil, nil, fmt.Errorf("runtime options of type %s: %v: %w", a.GetTypeUrl(), err, errdefs.ErrInvalidArgument)
	}
	if ro, ok := v.(*runcoptions.Options); ok {
		if err := checkRuncOptions(ro); err != nil {
			return nil, nil, err
		}
		return nil, ro, nil
	}
	ro, ok := v.(*runtimeoptions.Options)
	if !ok {
		return nil, nil, fmt.Errorf("runtime options of type %s are not boxlite's: use runtimeoptions.v1.Options (a TOML config path or body): %w", a.GetTypeUrl(), errdefs.ErrInvalidArgument)
	}
	body := ro.ConfigBody
	if len(body) == 0 && ro.ConfigPath != "" {
		if body, err = os.ReadFile(ro.ConfigPath); err != nil {
			return nil, nil, fmt.Errorf("runtime options file %s: %v: %w", ro.ConfigPath, err, errdefs.ErrInvalidArgument)
		}
	}
	var raw map[string]any
	if err := toml.Unmarshal(body, &raw); err != nil {
		return nil, nil, fmt.Errorf("runtime options %s: %v: %w", ro.ConfigPath, err, errdefs.ErrInvalidArgument)
	}
	out := map[string]string{}
	for k, val := range raw {
		if _, ok := optionKeys[k]; !ok {
			return nil, nil, fmt.Errorf("runtime options %s: unknown key %q (known: %s): %w", ro.ConfigPath, k, optionNames, errdefs.ErrInvalidArgument)
		}
		out[k] = fmt.Sprint(val)
	}
	return out, nil, nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
