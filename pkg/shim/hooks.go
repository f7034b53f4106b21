package shim

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/hooks"
	"github.com/boxlite/boxlite/pkg/network"
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

// runHooks runs the box's hooks of the given kinds in order, on the host,
// with the OCI state on stdin; its pid is the VMM's, whose network
// namespace is the box's. prestart and createRuntime failures are returned
// (the caller tears the box down); poststart and poststop failures are
// logged and the remaining hooks still run, as the runtime spec says.
func (b *box) runHooks(ctx context.Context, kinds ...string) error {
	return b.runHooksPid(ctx, int(b.vmmPid()), kinds...)
}

// runHooksPid is runHooks with the pid the state carries.
func (b *box) runHooksPid(ctx context.Context, pid int, kinds ...string) error {
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

// startNetwork wires the box's network namespace to its VM and configures
// the guest's interfaces, just before the container's process starts, and
// records the result for `boxlite inspect`.
func (b *box) startNetwork(ctx context.Context) error {
	cfg, err := b.net.wire(ctx, b.id)
	if err != nil {
		return fmt.Errorf("network of %s: %w", b.id, err)
	}
	info := network.Info{Mode: "netns", NetNS: b.net.path}
	if b.net.ns != nil && len(b.net.taps) == 0 {
		info.Mode = "none"
	}
	if b.net.user != nil {
		info.Mode = "user"
		for _, f := range b.net.user.Forwards {
			info.Ports = append(info.Ports, f.String())
		}
	}
	if cfg != nil {
		if _, err := b.sb.Agent().ConfigureNetwork(ctx, cfg); err != nil {
			return fmt.Errorf("configure the network of %s in the guest: %w", b.id, errgrpc.ToNative(err))
		}
		for _, i := range cfg.Interfaces {
			mac := i.Mac
			if mac == "" {
				mac = i.DeviceMac
			}
			info.Interfaces = append(info.Interfaces, network.InfoInterface{Name: i.Name, MAC: mac, Addresses: i.Addresses})
		}
	}
	if err := network.WriteInfo(b.bundle, info); err != nil {
		log.G(ctx).WithError(err).WithField("id", b.id).Warn("write network info")
	}
	return nil
}
