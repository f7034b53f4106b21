package shim

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/hooks"
)

// The OCI hook kinds the shim runs, on the host; the guest never sees a
// hook. createContainer and startContainer hooks are defined to run in the
// container's namespaces, which are in the guest, where host binaries
// cannot run: they are refused at Create.
const (
	hookPrestart      = "prestart"
	hookCreateRuntime = "createRuntime"
	hookPoststart     = "poststart"
	hookPoststop      = "poststop"
)

// checkHooks validates the spec's hooks before anything is made, and
// refuses the kinds a VM runtime cannot honour.
func checkHooks(spec *specs.Spec) error {
	h := spec.Hooks
	if h == nil {
		return nil
	}
	if len(h.CreateContainer) > 0 || len(h.StartContainer) > 0 {
		return fmt.Errorf("createContainer and startContainer hooks run in the container's namespaces, which are inside the VM, where host binaries cannot run: use prestart or createRuntime hooks: %w", errdefs.ErrInvalidArgument)
	}
	var errs []error
	for _, kind := range []string{hookPrestart, hookCreateRuntime, hookPoststart, hookPoststop} {
		if err := hooks.Validate(kind, hookList(h, kind)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// hookList returns the hooks of one kind.
func hookList(h *specs.Hooks, kind string) []specs.Hook {
	switch kind {
	case hookPrestart:
		// Deprecated by the runtime spec in favour of createRuntime, but
		// still what many tools write.
		return h.Prestart
	case hookCreateRuntime:
		return h.CreateRuntime
	case hookPoststart:
		return h.Poststart
	case hookPoststop:
		return h.Poststop
	}
	return nil
}

// hookStatus is the container status the hooks of kind see, as with runc.
var hookStatus = map[string]specs.ContainerState{
	hookPrestart:      specs.StateCreating,
	hookCreateRuntime: specs.StateCreating,
	hookPoststart:     specs.StateRunning,
	hookPoststop:      specs.StateStopped,
}

// runHooks runs the container's hooks of the given kinds in order, on the
// host, with the OCI state on stdin; its pid is the VMM's (pid), whose
// network namespace is the box's. prestart and createRuntime failures are
// returned (the caller undoes the create); poststart and poststop failures
// are logged and the remaining hooks still run, as the runtime spec says.
func (b *container) runHooks(ctx context.Context, pid int, kinds ...string) error {
	if b.ociSpec == nil || b.ociSpec.Hooks == nil {
		return nil
	}
	for _, kind := range kinds {
		list := hookList(b.ociSpec.Hooks, kind)
		if len(list) == 0 {
			continue
		}
		state := &specs.State{
			Version: specs.Version, ID: b.id, Status: hookStatus[kind], Pid: pid,
			Bundle: b.bundle, Annotations: b.ociSpec.Annotations,
		}
		switch kind {
		case hookPrestart, hookCreateRuntime:
			if err := hooks.Run(ctx, kind, list, state); err != nil {
				return err
			}
		default:
			for _, err := range hooks.RunAll(context.WithoutCancel(ctx), kind, list, state) {
				log.G(ctx).WithError(err).WithField("id", b.id).Warnf("%s hook failed", kind)
			}
		}
	}
	return nil
}
