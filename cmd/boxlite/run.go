package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/health"
	"github.com/boxlite/boxlite/pkg/manager"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// boxOptions are the flags that describe a new box (run and create).
type boxOptions struct {
	rootfs, workdir, user, name, memory string
	env                                 envFlag
	// network, ports and volumes connect the box to the host.
	network        string
	ports, volumes multiFlag
	// labels are -l K=V.
	labels multiFlag
	cpus   float64
	state  *string
	// noHealth and health (by annotation) tune the box's health check.
	noHealth bool
	health   map[string]*string
	// privileged is --privileged.
	privileged bool
}

// healthFlags maps the health flags to the annotations they set.
var healthFlags = []struct{ flag, annotation, usage string }{
	{"health-interval", health.AnnotationInterval, "time between health probes (default 30s)"},
	{"health-timeout", health.AnnotationTimeout, "bound of one health probe (default 10s)"},
	{"health-start-period", health.AnnotationStartPeriod, "time after start when failed probes do not count (default 60s)"},
	{"health-retries", health.AnnotationRetries, "failed probes in a row that make the box unhealthy (default 3)"},
}

// addBoxFlags adds the flags of a new box to fs.
func addBoxFlags(env *cliEnv, fs *flag.FlagSet, o *boxOptions) {
	fs.StringVar(&o.rootfs, "rootfs", "", "root filesystem directory of the box, instead of an IMAGE")
	fs.Var(&o.env, "e", "set an environment variable K=V (repeatable)")
	fs.StringVar(&o.workdir, "w", "", "working directory in the box (default /)")
	fs.StringVar(&o.user, "u", "", "UID[:GID] (or a user name from the rootfs) to run as")
	fs.StringVar(&o.name, "name", "", "box name (unique; default: none, use the id)")
	fs.StringVar(&o.memory, "memory", "", "memory limit of the process, e.g. 256m or 1g (plain number: MiB)")
	fs.Float64Var(&o.cpus, "cpus", 0, "CPUs of the box: sizes the VM and sets a CPU quota")
	fs.StringVar(&o.network, "network", manager.NetworkUser, "the box's network: user (outbound NAT, -p works, no host set-up), none (loopback only) or netns:PATH (the VM joins that network namespace)")
	fs.Var(&o.ports, "p", "publish a box port on the host with --network user: [IP:]HOSTPORT:BOXPORT[/tcp|udp] (repeatable)")
	fs.Var(&o.volumes, "v", "bind-mount a host path into the box: HOSTPATH:BOXPATH[:ro] (repeatable)")
	fs.Var(&o.labels, "l", "set a label K=V on the box, to filter by (repeatable)")
	fs.BoolVar(&o.privileged, "privileged", false, "give the process every capability, no seccomp filter, every device and writable /proc and /sys: of the box's VM, not of the host")
	fs.BoolVar(&o.noHealth, "no-health-check", false, "turn off the box's health check (on by default: is the VM running and its agent answering)")
	o.health = map[string]*string{}
	for _, f := range healthFlags {
		o.health[f.annotation] = fs.String(f.flag, "", f.usage)
	}
	o.state = stateFlag(env, fs)
}

// healthSettings validates the health flags and sets the request's
// health settings (none for the defaults).
func (o *boxOptions) healthSettings(cmd string, req *api.CreateRequest) error {
	var check health.Options
	custom := &api.HealthCheck{}
	set := false
	for _, f := range healthFlags {
		v := *o.health[f.annotation]
		if v == "" {
			continue
		}
		if o.noHealth {
			return usageErrorf(cmd, "--%s makes no sense with --no-health-check", f.flag)
		}
		if err := check.Set(f.annotation, v, "--"+f.flag); err != nil {
			return usageErrorf(cmd, "%v", err)
		}
		set = true
		switch f.annotation {
		case health.AnnotationInterval:
			custom.Interval = v
		case health.AnnotationTimeout:
			custom.Timeout = v
		case health.AnnotationStartPeriod:
			custom.StartPeriod = v
		case health.AnnotationRetries:
			custom.Retries = check.Retries
		}
	}
	if o.noHealth {
		disabled := true
		req.HealthCheckDisabled = &disabled
	}
	if set {
		req.HealthCheck = custom
	}
	return nil
}

// createRequest turns the flags and the command into a create request.
// Relative paths are resolved here, against the CLI's directory (the
// daemon's is not the user's); everything else is checked by the manager,
// for the CLI and the REST API alike.
func (o *boxOptions) createRequest(cmd string, argv []string, terminal, openStdin bool) (api.CreateRequest, error) {
	var req api.CreateRequest
	if o.rootfs == "" {
		// boxlite run [flags] IMAGE [--] [CMD [ARGS...]]
		if len(argv) == 0 {
			return req, usageErrorf(cmd, "give an IMAGE [CMD...], or --rootfs DIR -- CMD [ARGS...]")
		}
		req.Image, argv = argv[0], argv[1:]
		if len(argv) > 0 && argv[0] == "--" {
			argv = argv[1:]
		}
	} else {
		if len(argv) == 0 {
			return req, usageErrorf(cmd, "no command given: boxlite %s --rootfs DIR -- CMD [ARGS...]", cmd)
		}
		abs, err := filepath.Abs(o.rootfs)
		if err != nil {
			return req, err
		}
		req.Rootfs = abs
	}
	mem, err := parseMemory(o.memory)
	if o.memory != "" && err != nil {
		return api.CreateRequest{}, usageErrorf(cmd, "--memory: %v", err)
	}
	if o.cpus < 0 {
		return api.CreateRequest{}, usageErrorf(cmd, "--cpus must be positive")
	}
	req.Cmd, req.Env, req.Cwd, req.User, req.Memory, req.CPUs = argv, o.env, o.workdir, o.user, mem, o.cpus
	req.Network, req.Ports, req.Name, req.TTY, req.OpenStdin = o.network, o.ports, o.name, terminal, openStdin
	req.Privileged = o.privileged
	if err := o.healthSettings(cmd, &req); err != nil {
		return api.CreateRequest{}, err
	}
	if len(o.ports) > 0 && o.network != manager.NetworkUser {
		return api.CreateRequest{}, usageErrorf(cmd, "-p publishes ports with --network user only")
	}
	for _, p := range o.ports {
		if _, err := vmm.ParseForward(p); err != nil {
			return api.CreateRequest{}, usageErrorf(cmd, "-p: %v", err)
		}
	}
	for _, v := range o.volumes {
		// Resolved against the CLI's directory and checked here: a
		// daemon's working directory is not the user's.
		vol, err := manager.ParseVolume(v)
		if err != nil {
			return api.CreateRequest{}, usageErrorf(cmd, "-v: %v", err)
		}
		spec := vol.Source + ":" + vol.Destination
		if vol.ReadOnly {
			spec += ":ro"
		}
		req.Volumes = append(req.Volumes, spec)
	}
	for _, l := range o.labels {
		k, v, _ := strings.Cut(l, "=")
		if k == "" {
			return api.CreateRequest{}, usageErrorf(cmd, "-l %q: want KEY[=VALUE]", l)
		}
		if req.Labels == nil {
			req.Labels = map[string]string{}
		}
		req.Labels[k] = v
	}
	return req, nil
}

// runRun creates a box, starts it and relays its stdio until its process
// exits, then stops it (or removes it with --rm) and exits with its status;
// with -d it prints the box id and leaves it running, its output in its
// log (boxlite logs).
func runRun(ctx context.Context, env *cliEnv, args []string) error {
	var o boxOptions
	var rm, detach, interactive, tty bool
	fs := newFlagSet(env, "run", "run [--rm] [-d] [-i] [-t] [--name N] [-l K=V] [-e K=V] [-w DIR] [-u UID[:GID]] [--memory M] [--cpus N] [--network user|none|netns:PATH] [-p [IP:]HOST:BOX] [-v HOST:BOX[:ro]] [--no-health-check | --health-interval D ...] (IMAGE [CMD [ARGS...]] | --rootfs DIR -- CMD [ARGS...])")
	addBoxFlags(env, fs, &o)
	fs.BoolVar(&rm, "rm", false, "remove the box when its process exits")
	fs.BoolVar(&detach, "d", false, "print the box id and leave it running (its output: boxlite logs ID)")
	fs.BoolVar(&interactive, "i", false, "keep stdin open and relay it to the process")
	fs.BoolVar(&tty, "t", false, "give the process a terminal")
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	req, err := o.createRequest("run", fs.Args(), tty, interactive)
	if err != nil {
		return err
	}
	if detach && (interactive || tty || rm) {
		return usageErrorf("run", "-d cannot be combined with -i, -t or --rm")
	}
	boxes, err := openBoxes(env, *o.state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	id, err := boxes.Create(ctx, req)
	if err != nil {
		return err
	}
	// From here the box exists: whatever happens, it is started, or
	// removed. ctx ends at the first SIGINT/SIGTERM, which from now on
	// are the box's.
	wctx := context.WithoutCancel(ctx)
	if err := ctx.Err(); err != nil {
		return joinErrors(fmt.Errorf("interrupted: %w", err), boxes.Remove(wctx, id, true))
	}
	if detach {
		if err := boxes.Start(wctx, id); err != nil {
			return joinErrors(err, boxes.Remove(wctx, id, true))
		}
		fmt.Fprintln(env.stdout, id)
		return nil
	}
	stdio, release := terminalStdio(env, interactive, tty)
	defer release()
	if err := boxes.Start(wctx, id); err != nil {
		return joinErrors(err, boxes.Remove(wctx, id, true))
	}
	exit, err := boxes.Attach(wctx, id, stdio)
	release()
	var terr error
	if rm {
		terr = boxes.Remove(wctx, id, true)
	} else {
		terr = boxes.Stop(wctx, id, api.StopRequest{})
	}
	if errdefs.IsNotFound(terr) {
		terr = nil // removed meanwhile (rm --force from elsewhere)
	}
	switch {
	case err != nil:
		return joinErrors(err, terr)
	case terr != nil:
		fmt.Fprintf(env.stderr, "boxlite: %v\n", terr)
		if exit.Status == 0 {
			return errReported
		}
	}
	if exit.Status != 0 {
		return exitCodeError{code: int(exit.Status)}
	}
	return nil
}

// runCreate creates a box without starting its process and prints its id.
func runCreate(ctx context.Context, env *cliEnv, args []string) error {
	var o boxOptions
	fs := newFlagSet(env, "create", "create [--name N] [-l K=V] [-e K=V] [-w DIR] [-u UID[:GID]] [--memory M] [--cpus N] [--network user|none|netns:PATH] [-p [IP:]HOST:BOX] [-v HOST:BOX[:ro]] [--no-health-check | --health-interval D ...] (IMAGE [CMD [ARGS...]] | --rootfs DIR -- CMD [ARGS...])")
	addBoxFlags(env, fs, &o)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	req, err := o.createRequest("create", fs.Args(), false, false)
	if err != nil {
		return err
	}
	boxes, err := openBoxes(env, *o.state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	id, err := boxes.Create(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprintln(env.stdout, id)
	return nil
}

// runStart starts a created box's process.
func runStart(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "start", "start ID|NAME")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	ref, err := oneBox(fs)
	if err != nil {
		return err
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	if err := boxes.Start(ctx, ref); err != nil {
		return err
	}
	b, err := boxes.Inspect(ctx, ref)
	if err != nil {
		return err
	}
	fmt.Fprintln(env.stdout, b.ID)
	return nil
}
