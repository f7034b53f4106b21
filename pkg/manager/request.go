package manager

import (
	"maps"
	"path/filepath"
	"strconv"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/health"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// CreateOptionsFromRequest validates a create request, from the REST API
// or the CLI's flags, and turns it into CreateOptions: the one place both
// front doors' settings are checked. Relative paths are the caller's to
// resolve; they are refused here (the daemon's working directory is not
// the client's).
func CreateOptionsFromRequest(req api.CreateRequest) (CreateOptions, error) {
	bad := func(format string, args ...any) (CreateOptions, error) {
		return CreateOptions{}, errorf(errdefs.ErrInvalidArgument, format, args...)
	}
	switch {
	case req.Image != "" && req.Rootfs != "":
		return bad("give an image or a rootfs, not both")
	case req.Image == "" && req.Rootfs == "":
		return bad("an image or a rootfs directory is required")
	case req.Rootfs != "" && !filepath.IsAbs(req.Rootfs):
		return bad("rootfs %q: the path must be absolute", req.Rootfs)
	case req.Rootfs != "" && len(req.Cmd) == 0:
		return bad("no command given")
	case req.CPUs < 0:
		return bad("cpus must be positive")
	}
	for k := range req.Labels {
		if k == "" {
			return bad("a label needs a key")
		}
	}
	ann, err := healthAnnotations(req.HealthCheckDisabled, req.HealthCheck)
	if err != nil {
		return CreateOptions{}, err
	}
	network := req.Network
	if network == "" {
		network = NetworkUser
	}
	if len(req.Ports) > 0 && network != NetworkUser {
		return bad("ports are published with network user only")
	}
	for _, p := range req.Ports {
		if _, err := vmm.ParseForward(p); err != nil {
			return bad("port %q: %v", p, err)
		}
	}
	var vols []Volume
	for _, v := range req.Volumes {
		if !filepath.IsAbs(v) {
			return bad("volume %q: the host path must be absolute", v)
		}
		vol, err := ParseVolume(v)
		if err != nil {
			return CreateOptions{}, err
		}
		vols = append(vols, vol)
	}
	return CreateOptions{
		ID:         NewID(),
		Name:       req.Name,
		Image:      req.Image,
		Labels:     maps.Clone(req.Labels),
		AutoRemove: req.AutoRemove,
		OpenStdin:  req.OpenStdin,
		Spec: BoxSpec{
			Args: req.Cmd, Env: req.Env, Cwd: req.Cwd, User: req.User,
			MemoryBytes: req.Memory, CPUs: req.CPUs, Terminal: req.TTY, Privileged: req.Privileged, Rootfs: req.Rootfs,
			Annotations: ann, Network: network, Ports: req.Ports, Volumes: vols,
		},
	}, nil
}

// healthAnnotations turns the three-state health settings into the
// annotations the shim reads: disabled (true) wins over custom settings;
// false or absent keeps the default checks, tuned by check if given. Each
// value is validated as the shim will read it.
func healthAnnotations(disabled *bool, check *api.HealthCheck) (map[string]string, error) {
	ann := map[string]string{}
	if disabled != nil && *disabled {
		ann[health.AnnotationDisabled] = "true"
		return ann, nil
	}
	if check == nil {
		return ann, nil
	}
	set := func(key, value, what string) error {
		if value == "" {
			return nil
		}
		var o health.Options
		if err := o.Set(key, value, what); err != nil {
			return err
		}
		ann[key] = value
		return nil
	}
	retries := ""
	if check.Retries != 0 {
		retries = strconv.Itoa(check.Retries)
	}
	for _, s := range []struct{ key, value, what string }{
		{health.AnnotationInterval, check.Interval, "health_check.interval"},
		{health.AnnotationTimeout, check.Timeout, "health_check.timeout"},
		{health.AnnotationStartPeriod, check.StartPeriod, "health_check.start_period"},
		{health.AnnotationRetries, retries, "health_check.retries"},
	} {
		if err := set(s.key, s.value, s.what); err != nil {
			return nil, err
		}
	}
	return ann, nil
}
