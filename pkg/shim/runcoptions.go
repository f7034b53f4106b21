package shim

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// runc's options type (containerd.runc.v1.Options) reaches every runtime,
// not only runc: containerd's client helpers WithShimCgroup, WithUIDOwner,
// WithGIDOwner, WithNoNewKeyring and WithNoPivotRoot set it as the task's
// options when none are set. A box honours what means something for it,
// ignores what only runc's own machinery uses, and refuses what would be
// silently wrong if ignored. docs/containerd.md lists which is which.

// taskOptions are the settings one container takes from runc's options.
//
// IoUid and IoGid need nothing: runc's shim makes the container's stdio
// pipes theirs so a process in a user namespace can use them, and in the
// guest crun already gives the std streams to the process's uid and gid
// (maybe_chown_std_streams); the host's end is the shim's alone.
type taskOptions struct {
	// noNewKeyring and noPivotRoot are passed to the guest's runtime.
	noNewKeyring, noPivotRoot bool
}

// parseTaskOptions returns the container settings of a task's options:
// none unless they are runc's type.
func parseTaskOptions(a *anypb.Any) (taskOptions, error) {
	_, ro, err := decodeRuntimeOptions(a)
	if err != nil || ro == nil {
		return taskOptions{}, err
	}
	return taskOptions{noNewKeyring: ro.GetNoNewKeyring(), noPivotRoot: ro.GetNoPivotRoot()}, nil
}

// checkRuncOptions refuses the runc options a box cannot honour and whose
// loss would go unnoticed, and logs the ones it ignores.
func checkRuncOptions(o *runcoptions.Options) error {
	bad := func(field, why string) error {
		return fmt.Errorf("runc option %s is not supported by boxlite: %s: %w", field, why, errdefs.ErrInvalidArgument)
	}
	switch {
	case o.GetBinaryName() != "":
		return bad("binary_name "+o.GetBinaryName(), "the OCI runtime runs inside the VM (crun, from the guest image), not on the host")
	case o.GetTaskApiAddress() != "" || o.GetTaskApiVersion() != 0:
		return bad("task_api_address", "the shim serves its task API on its own socket only")
	}
	ignored := map[string]bool{
		"root":            o.GetRoot() != "",
		"systemd_cgroup":  o.GetSystemdCgroup(),
		"criu_image_path": o.GetCriuImagePath() != "",
		"criu_work_path":  o.GetCriuWorkPath() != "",
	}
	for field, set := range ignored {
		if set {
			log.L.WithField("option", field).Debug("runc option ignored: it configures runc on the host, which a box does not use")
		}
	}
	return nil
}

// shimCgroupTimeout bounds the wait for a shim that could not be moved
// into its cgroup to die.
const shimCgroupTimeout = 10 * time.Second

// joinShimCgroup moves the new shim p into the cgroup that runc's options
// in the bootstrap parameters name (ShimCgroup), as the runc shim does. The
// VMM the shim starts later is born there too. If the move fails, the shim
// is killed and reaped: containerd gets the error and no shim.
func joinShimCgroup(ctx context.Context, params *bootapi.BootstrapParams, p *reaper.Process) error {
	var o runcoptions.Options
	found, err := params.FindExtension(&o)
	if err != nil {
		err = fmt.Errorf("runtime options in the bootstrap parameters: %w", err)
	} else if !found || o.GetShimCgroup() == "" {
		return nil
	} else {
		err = addToCgroup(o.GetShimCgroup(), p.Pid())
	}
	if err == nil {
		return nil
	}
	_ = p.Signal(syscall.SIGKILL)
	wctx, cancel := context.WithTimeout(ctx, shimCgroupTimeout)
	defer cancel()
	if _, werr := p.Wait(wctx); werr != nil {
		log.G(ctx).WithError(werr).WithField("pid", p.Pid()).Warn("shim not reaped after a failed cgroup move")
	}
	return err
}

// addToCgroup moves pid into the cgroup at path (relative to the cgroup
// root), on a cgroup v2 host or in every v1 hierarchy of a v1 or hybrid one.
func addToCgroup(path string, pid int) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return fmt.Errorf("shim cgroup %s: %w", path, err)
		}
		if err := m.AddProc(uint64(pid)); err != nil {
			return fmt.Errorf("join shim cgroup %s: %w", path, err)
		}
		return nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return fmt.Errorf("shim cgroup %s: %w", path, err)
	}
	if err := cg.AddProc(uint64(pid)); err != nil {
		return fmt.Errorf("join shim cgroup %s: %w", path, err)
	}
	return nil
}
