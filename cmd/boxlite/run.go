package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

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
	cpus           float64
	state          *string
	// noHealth and health (by annotation) tune the box's health check.
	noHealth bool
	health   map[string]*string
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
	fs.StringVar(&o.rootfs, "rootfs", "", "root filesystem directory of the box (required)")
	fs.Var(&o.env, "e", "set an environment variable K=V (repeatable)")
	fs.StringVar(&o.workdir, "w", "", "working directory in the box (default /)")
	fs.StringVar(&o.user, "u", "", "UID[:GID] (or a user name from the rootfs) to run as")
	fs.StringVar(&o.name, "name", "", "box name (unique; default: none, use the id)")
	fs.StringVar(&o.memory, "memory", "", "memory limit of the process, e.g. 256m or 1g (plain number: MiB)")
	fs.Float64Var(&o.cpus, "cpus", 0, "CPUs of the box: sizes the VM and sets a CPU quota")
	fs.StringVar(&o.network, "network", manager.NetworkUser, "the box's network: user (outbound NAT, -p works, no host set-up), none (loopback only) or netns:PATH (the VM joins that network namespace)")
	fs.Var(&o.ports, "p", "publish a box port on the host with --network user: [IP:]HOSTPORT:BOXPORT[/tcp|udp] (repeatable)")
	fs.Var(&o.volumes, "v", "bind-mount a host path into the box: HOSTPATH:BOXPATH[:ro] (repeatable)")
	fs.BoolVar(&o.noHealth, "no-health-check", false, "turn off the box's health check (on by default: is the VM running and its agent answering)")
	o.health = map[string]*string{}
	for _, f := range healthFlags {
		o.health[f.annotation] = fs.String(f.flag, "", f.usage)
	}
	o.state = stateFlag(env, fs)
}

// healthAnnotations validates the health flags and returns the annotations
// they set (none for the defaults).
func (o *boxOptions) healthAnnotations(cmd string) (map[string]string, error) {
	ann := map[string]string{}
	var check health.Options
	for _, f := range healthFlags {
		v := *o.health[f.annotation]
		if v == "" {
			continue
		}
		if o.noHealth {
			return nil, usageErrorf(cmd, "--%s makes no sense with --no-health-check", f.flag)
		}
		if err := check.Set(f.annotation, v, "--"+f.flag); err != nil {
			return nil, usageErrorf(cmd, "%v", err)
		}
		ann[f.annotation] = v
	}
	if o.noHealth {
		ann[health.AnnotationDisabled] = "true"
	}
	return ann, nil
}

// createOptions turns the flags and the command into CreateOptions.
func (o *boxOptions) createOptions(cmd string, argv []string, terminal bool) (manager.CreateOptions, error) {
	if len(argv) == 0 {
		return manager.CreateOptions{}, usageErrorf(cmd, "no command given: boxlite %s --rootfs DIR -- CMD [ARGS...]", cmd)
	}
	if o.rootfs == "" {
		return manager.CreateOptions{}, usageErrorf(cmd, "--rootfs DIR is required")
	}
	mem, err := parseMemory(o.memory)
	if o.memory != "" && err != nil {
		return manager.CreateOptions{}, usageErrorf(cmd, "--memory: %v", err)
	}
	if o.cpus < 0 {
		return manager.CreateOptions{}, usageErrorf(cmd, "--cpus must be positive")
	}
	ann, err := o.healthAnnotations(cmd)
	if err != nil {
		return manager.CreateOptions{}, err
	}
	if len(o.ports) > 0 && o.network != manager.NetworkUser {
		return manager.CreateOptions{}, usageErrorf(cmd, "-p publishes ports with --network user only")
	}
	for _, p := range o.ports {
		if _, err := vmm.ParseForward(p); err != nil {
			return manager.CreateOptions{}, usageErrorf(cmd, "-p: %v", err)
		}
	}
	var vols []manager.Volume
	for _, v := range o.volumes {
		vol, err := manager.ParseVolume(v)
		if err != nil {
			return manager.CreateOptions{}, usageErrorf(cmd, "-v: %v", err)
		}
		vols = append(vols, vol)
	}
	return manager.CreateOptions{
		ID:   manager.NewID(),
		Name: o.name,
		Spec: manager.BoxSpec{
			Args: argv, Env: o.env, Cwd: o.workdir, User: o.user,
			MemoryBytes: mem, CPUs: o.cpus, Terminal: terminal, Rootfs: o.rootfs,
			Annotations: ann, Network: o.network, Ports: o.ports, Volumes: vols,
		},
	}, nil
}

// runRun creates a box, runs its process with the terminal's stdio relayed
// through FIFOs, and exits with the process's status; or, with -d, prints
// the box id and leaves it running with its shim.
func runRun(ctx context.Context, env *cliEnv, args []string) error {
	var o boxOptions
	var rm, detach, interactive, tty bool
	fs := newFlagSet(env, "run", "run [--rm] [-d] [-i] [-t] [--name N] [-e K=V] [-w DIR] [-u UID[:GID]] [--memory M] [--cpus N] [--network user|none|netns:PATH] [-p [IP:]HOST:BOX] [-v HOST:BOX[:ro]] [--no-health-check | --health-interval D ...] --rootfs DIR -- CMD [ARGS...]")
	addBoxFlags(env, fs, &o)
	fs.BoolVar(&rm, "rm", false, "remove the box when its process exits")
	fs.BoolVar(&detach, "d", false, "print the box id and leave it running (output goes to box.log in its directory)")
	fs.BoolVar(&interactive, "i", false, "keep stdin open and relay it to the process")
	fs.BoolVar(&tty, "t", false, "give the process a terminal")
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	co, err := o.createOptions("run", fs.Args(), tty)
	if err != nil {
		return err
	}
	if detach && (interactive || tty || rm) {
		return usageErrorf("run", "-d cannot be combined with -i, -t or --rm")
	}
	m, err := openManager(*o.state)
	if err != nil {
		return err
	}
	// While it runs, this process serves the events socket (unless another
	// does) and records the exits of every box.
	exited := make(chan struct{})
	var once sync.Once
	stop, serving := m.ServeEvents(func(ev manager.Event) {
		if ev.Exited && ev.ID == co.ID && ev.ExecID == "" {
			once.Do(func() { close(exited) })
		}
	})
	defer stop()
	if detach {
		return createDetached(ctx, env, m, co, true)
	}
	var waitExit <-chan struct{}
	if serving && !rm {
		waitExit = exited
	}
	return runForeground(ctx, env, m, co, interactive, rm, waitExit)
}

// exitEventTimeout bounds the wait for a box's own TaskExit event.
const exitEventTimeout = 2 * time.Second

// runForeground creates and starts the box with its stdio relayed, waits
// for its process, then removes the box (--rm) or stops it, keeping its
// record. With exited (closed when the box's TaskExit event was recorded)
// it waits, bounded, for that event: the shim publishes an OOM kill before
// the exit, so the kept record then says whether the box was OOM-killed.
func runForeground(ctx context.Context, env *cliEnv, m *manager.Manager, co manager.CreateOptions, interactive, rm bool, exited <-chan struct{}) error {
	var fifos *manager.FIFOs
	var stdin io.Reader
	if interactive {
		stdin = env.stdin
	}
	co.Stdio = func(dir string) (manager.Stdio, error) {
		f, err := manager.NewFIFOs(dir, co.ID, stdin, env.stdout, env.stderr, co.Spec.Terminal)
		if err != nil {
			return manager.Stdio{}, err
		}
		fifos = f
		return f.Stdio(), nil
	}
	box, err := m.Create(ctx, co)
	if err != nil {
		if fifos != nil {
			fifos.Close()
		}
		return err
	}
	defer fifos.Close()
	defer box.Close()
	code, started, err := attach(ctx, env, box, "", fifos, co.Spec.Terminal)
	tctx := context.WithoutCancel(ctx)
	if !started {
		// Nothing half-created: a box whose process never started goes.
		if rerr := box.Remove(tctx, true); rerr != nil {
			return joinErrors(err, rerr)
		}
		return err
	}
	var terr error
	if rm {
		terr = box.Remove(tctx, true)
	} else {
		terr = box.Stop(tctx)
	}
	drainOutput(env, fifos)
	if exited != nil && err == nil {
		select {
		case <-exited:
		case <-time.After(exitEventTimeout):
		}
	}
	switch {
	case err != nil:
		return joinErrors(err, terr)
	case terr != nil:
		fmt.Fprintf(env.stderr, "boxlite: %v\n", terr)
		if code == 0 {
			return errReported
		}
	}
	if code != 0 {
		return exitCodeError{code: code}
	}
	return nil
}

// runCreate creates a box without starting its process and prints its id.
// Its output will go to box.log in its directory.
func runCreate(ctx context.Context, env *cliEnv, args []string) error {
	var o boxOptions
	fs := newFlagSet(env, "create", "create [--name N] [-e K=V] [-w DIR] [-u UID[:GID]] [--memory M] [--cpus N] [--network user|none|netns:PATH] [-p [IP:]HOST:BOX] [-v HOST:BOX[:ro]] [--no-health-check | --health-interval D ...] --rootfs DIR -- CMD [ARGS...]")
	addBoxFlags(env, fs, &o)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	co, err := o.createOptions("create", fs.Args(), false)
	if err != nil {
		return err
	}
	m, err := openManager(*o.state)
	if err != nil {
		return err
	}
	stop, _ := m.ServeEvents(nil)
	defer stop()
	return createDetached(ctx, env, m, co, false)
}

// createDetached creates a box whose output goes to its log file, starts
// it if asked, and prints its id. A box that fails to start is removed.
func createDetached(ctx context.Context, env *cliEnv, m *manager.Manager, co manager.CreateOptions, start bool) error {
	co.Stdio = func(dir string) (manager.Stdio, error) { return manager.LogStdio(dir), nil }
	box, err := m.Create(ctx, co)
	if err != nil {
		return err
	}
	defer box.Close()
	if start {
		if _, err := box.Start(ctx, ""); err != nil {
			return joinErrors(err, box.Remove(context.WithoutCancel(ctx), true))
		}
	}
	fmt.Fprintln(env.stdout, box.ID())
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
	box, done, err := getBox(ctx, *state, ref, true)
	if err != nil {
		return err
	}
	defer done()
	if st := box.Record().Status; st != manager.StatusCreated {
		return fmt.Errorf("box %s is %s: only a created box can be started", ref, st)
	}
	if _, err := box.Start(ctx, ""); err != nil {
		return err
	}
	fmt.Fprintln(env.stdout, box.ID())
	return nil
}
