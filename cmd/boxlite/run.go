package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// defaultStateRoot holds one directory per running box.
const defaultStateRoot = "/run/boxlite"

// exitCodeError makes boxlite exit with the box's exit status.
type exitCodeError struct{ code int }

func (e exitCodeError) Error() string { return "exit status " + strconv.Itoa(e.code) }

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// runOptions are the flags of boxlite run.
type runOptions struct {
	rootfs, workdir, user, name string
	env                         multiFlag
	memoryMiB, cpus             int
	rm, interactive             bool
	kernel, initrd, stateRoot   string
}

// runRun boots a box, runs one process in it with the terminal's stdio, and
// exits with the process's status. (The box runs directly on pkg/sandbox for
// now; the shim will take this path over.)
func runRun(ctx context.Context, env *cliEnv, args []string) error {
	var o runOptions
	fs := newFlagSet(env, "run", "run [flags] --rootfs DIR -- CMD [ARGS...]")
	fs.StringVar(&o.rootfs, "rootfs", "", "root filesystem directory of the box (required)")
	fs.Var(&o.env, "e", "set an environment variable K=V (repeatable)")
	fs.StringVar(&o.workdir, "w", "/", "working directory in the box")
	fs.StringVar(&o.user, "u", "", "UID[:GID] to run as")
	fs.StringVar(&o.name, "name", "", "box name (default: random)")
	fs.IntVar(&o.memoryMiB, "memory", 0, "memory limit of the process in MiB (the VM gets 256 MiB)")
	fs.IntVar(&o.cpus, "cpus", 1, "virtual CPUs of the VM")
	fs.BoolVar(&o.rm, "rm", true, "remove the box when it exits (always, for now)")
	fs.BoolVar(&o.interactive, "i", false, "keep stdin open and send it to the process")
	fs.StringVar(&o.kernel, "kernel", "", "guest kernel (default: see boxlite check)")
	fs.StringVar(&o.initrd, "initrd", "", "guest initramfs (default: see boxlite check)")
	fs.StringVar(&o.stateRoot, "state", defaultStateRoot, "state directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return fmt.Errorf("run: no command given: %w", errUsage)
	}
	if o.rootfs == "" {
		return errors.New("run: --rootfs DIR is required")
	}
	return runBox(ctx, env, o, fs.Args())
}

func runBox(ctx context.Context, env *cliEnv, o runOptions, argv []string) error {
	reaper.Default()
	rootfs, err := filepath.Abs(o.rootfs)
	if err != nil {
		return err
	}
	id := o.name
	if id == "" {
		id = randomID()
	}
	spec, err := buildSpec(id, o, argv)
	if err != nil {
		return err
	}
	kernel, err := vmm.FindKernel(o.kernel)
	if err != nil {
		return err
	}
	initrd, err := vmm.FindInitrd(o.initrd)
	if err != nil {
		return err
	}
	stateDir := filepath.Join(o.stateRoot, id)
	if err := os.MkdirAll(o.stateRoot, 0o711); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := os.Mkdir(stateDir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("a box named %q exists (%s)", id, stateDir)
		}
		return fmt.Errorf("state directory: %w", err)
	}
	defer os.RemoveAll(stateDir)

	sb, err := sandbox.Start(ctx, sandbox.Config{VM: vmm.Config{
		Kernel: kernel, Initrd: initrd, Rootfs: rootfs, StateDir: stateDir, VCPUs: o.cpus,
	}})
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = sb.Stop(sctx)
	}()
	status, err := runProcess(sb, id, spec, o.interactive, env)
	if err != nil {
		return err
	}
	if status != 0 {
		return exitCodeError{code: status}
	}
	return nil
}

// buildSpec makes containerd's default Linux spec for argv with the flags applied.
func buildSpec(id string, o runOptions, argv []string) ([]byte, error) {
	opts := []oci.SpecOpts{
		oci.WithProcessArgs(argv...), oci.WithRootFSPath("rootfs"),
		oci.WithEnv(o.env), oci.WithProcessCwd(o.workdir),
	}
	if o.user != "" {
		opts = append(opts, oci.WithUser(o.user))
	}
	if o.memoryMiB > 0 {
		opts = append(opts, oci.WithMemoryLimit(uint64(o.memoryMiB)<<20))
	}
	ctx := namespaces.WithNamespace(context.Background(), "boxlite")
	spec, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: id}, opts...)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	return json.Marshal(spec)
}

// runProcess creates and starts the box's process, relays stdio and the
// SIGINT/SIGTERM the manager receives, and returns its exit status.
func runProcess(sb *sandbox.Sandbox, id string, spec []byte, interactive bool, env *cliEnv) (int, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := sb.Agent()
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{
		Id: id, Spec: spec, RootfsTag: vmm.RootfsTag,
		Stdio: &api.Stdio{Stdin: interactive, Stdout: true, Stderr: true},
	}); err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	var wg sync.WaitGroup
	relay := func(stream api.StdioStream, w io.Writer) {
		defer wg.Done()
		if _, err := c.CopyOutput(ctx, id, "", stream, w); err != nil && ctx.Err() == nil {
			fmt.Fprintf(env.stderr, "boxlite: %s: %v\n", stream, err)
		}
	}
	wg.Add(2)
	go relay(api.StdioStream_STDOUT, env.stdout)
	go relay(api.StdioStream_STDERR, env.stderr)
	if _, err := c.StartContainer(ctx, &api.ContainerRequest{Id: id}); err != nil {
		cancel()
		wg.Wait()
		return 0, fmt.Errorf("start: %w", err)
	}
	if interactive {
		go c.CopyInput(ctx, id, "", os.Stdin)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			c.SignalProcess(ctx, &api.SignalProcessRequest{Id: id, Signal: uint32(s.(syscall.Signal))})
		}
	}()
	exit, err := c.Wait(ctx, id, "")
	if err != nil {
		return 0, fmt.Errorf("wait: %w", err)
	}
	wg.Wait()
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	defer dcancel()
	c.DeleteContainer(dctx, &api.DeleteContainerRequest{Id: id, Force: true})
	return int(exit.ExitStatus), nil
}

func randomID() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
