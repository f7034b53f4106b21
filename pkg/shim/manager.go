package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/share"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// manager implements the shim binary's start and delete actions.
type manager struct{ name string }

var _ shim.Shim = manager{}

// NewManager returns the shim manager for the runtime name
// (io.containerd.boxlite.v1).
func NewManager(name string) shim.Shim { return manager{name: name} }

// Name returns the runtime name.
func (m manager) Name() string { return m.name }

// Start is the "start" action: it spawns the long-lived shim for one box
// with its listening socket as fd 3, and returns the socket's address. The
// spawned shim is not waited for here: this process exits at once and the
// shim is reparented to containerd (or the manager), its subreaper.
func (m manager) Start(ctx context.Context, params *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	id := params.GetInstanceID()
	if id == "" {
		return nil, fmt.Errorf("bootstrap params carry no instance id: %w", errdefs.ErrInvalidArgument)
	}
	ns := params.GetNamespace()
	if ns == "" {
		ns, _ = namespaces.Namespace(ctx)
	}
	socketDir := params.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(filepath.Dir(stateRoot), "s")
	}
	// A pod's app container is served by its sandbox's shim: the socket
	// is named after the group (the sandbox id), as the runc shim does.
	group, member, err := shimGroup(".", id)
	if err != nil {
		return nil, err
	}
	addr, err := shim.CreateSocketAddress(ctx, socketDir, params.GetContainerdGrpcAddress(), group, false)
	if err != nil {
		return nil, err
	}
	if member {
		if !shim.CanConnect(addr) {
			return nil, fmt.Errorf("container %s belongs to pod sandbox %s, which has no running shim: %w", id, group, errdefs.ErrNotFound)
		}
		log.G(ctx).WithField("id", id).WithField("sandbox", group).Debug("start: joining the pod sandbox's shim")
		return &bootapi.BootstrapResult{Version: 3, Address: addr, Protocol: "ttrpc"}, nil
	}
	l, running, err := listenOnce(addr)
	if err != nil {
		return nil, err
	}
	if running {
		// A shim for this id already runs: containerd reuses it.
		return &bootapi.BootstrapResult{Version: 3, Address: addr, Protocol: "ttrpc"}, nil
	}
	f, err := l.File()
	// The socket file must outlive this process's listener: the spawned
	// shim serves on the inherited fd.
	l.SetUnlinkOnClose(false)
	l.Close()
	if err != nil {
		shim.RemoveSocket(addr)
		return nil, err
	}
	defer f.Close()
	defer func() {
		if retErr != nil {
			shim.RemoveSocket(addr)
		}
	}()
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", params.GetContainerdGrpcAddress()}
	if params.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir, _ = os.Getwd()
	cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
	cmd.ExtraFiles = []*os.File{f}
	// Its own process group: a signal to containerd's group (Ctrl-C on a
	// foreground containerd) does not reach the shim.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// No oom_score_adj change: a negative one fails with EPERM here, and
	// the shim keeps its parent's score.
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		return nil, fmt.Errorf("start shim: %w", err)
	}
	if err := joinShimCgroup(ctx, params, p); err != nil {
		return nil, err
	}
	return &bootapi.BootstrapResult{Version: 3, Address: addr, Protocol: "ttrpc"}, nil
}

// listenOnce makes the shim's listening socket at addr, replacing a stale
// one, or reports that a shim already serves it. Start actions for one
// address serialise on a lock of the socket directory: without it, one
// could find the other's socket bound but not yet listening, take it for a
// stale one and replace it, and both would spawn a shim, one of them
// serving an unlinked socket forever.
func listenOnce(addr string) (_ *net.UnixListener, running bool, _ error) {
	dir := filepath.Dir(strings.TrimPrefix(addr, "unix://"))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("shim socket directory: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, false, fmt.Errorf("shim socket directory: %w", err)
	}
	defer d.Close() // and the lock with it
	for {
		err = unix.Flock(int(d.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, false, fmt.Errorf("lock shim socket directory %s: %w", dir, os.NewSyscallError("flock", err))
	}
	l, err := shim.NewSocket(addr)
	if err == nil {
		return l, false, nil
	}
	if !shim.SocketEaddrinuse(err) {
		return nil, false, fmt.Errorf("create shim socket %s: %w", addr, err)
	}
	if shim.CanConnect(addr) {
		return nil, true, nil
	}
	if err := shim.RemoveSocket(addr); err != nil {
		return nil, false, fmt.Errorf("remove stale shim socket: %w", err)
	}
	if l, err = shim.NewSocket(addr); err != nil {
		return nil, false, fmt.Errorf("create shim socket %s: %w", addr, err)
	}
	return l, false, nil
}

// shimGroup reads the spec in bundle (the start action runs in the bundle)
// and returns the id the shim's socket is named after: the pod sandbox's
// id for a pod's app container (member), else the container's own. A
// bundle without a readable spec groups by id: Create reports the spec's
// problems.
func shimGroup(bundle, id string) (group string, member bool, err error) {
	_, spec, err := readSpec(bundle)
	if err != nil {
		return id, false, nil
	}
	role, sbID, err := roleOf(id, spec)
	if err != nil {
		return "", false, err
	}
	return sbID, role == rolePodMember, nil
}

// Stop is the "delete" action, run by containerd (or the manager) when the
// shim is gone: it kills the box's VMM found through its pid file (checked
// against the process start time, so a reused pid is never hit), waits for
// it to be gone, and only then unmounts the rootfs and removes the VM state.
// A shim that still serves the box's address is ended first (endLiveShim).
// The task's exit is reported as 137.
func (m manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	ns, _ := namespaces.Namespace(ctx)
	bundle, err := os.Getwd()
	if err != nil {
		return shim.StopStatus{}, err
	}
	if opts, ok := ctx.Value(shim.OptsKey{}).(shim.Opts); ok && opts.BundlePath != "" {
		bundle = opts.BundlePath
	}
	stateDir := boxStateDir(ns, id)
	if err := endLiveShim(ctx, id, bundle); err != nil {
		return shim.StopStatus{}, fmt.Errorf("delete %s: %w", id, err)
	}
	kctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	vm, err := vmm.KillStale(kctx, stateDir)
	if err != nil {
		return shim.StopStatus{}, fmt.Errorf("delete %s: %w", id, err)
	}
	// The VMM is dead: undo what the shim left, in the order teardown
	// does. The state directory is removed only once the share is
	// unmounted, or its removal would reach the host's files.
	created := dirExists(stateDir)
	if err := unwireStale(stateDir); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("unwire network")
	}
	shareErr := share.Remove(filepath.Join(stateDir, shareDirName))
	if shareErr != nil {
		log.G(ctx).WithError(shareErr).WithField("id", id).Warn("remove share")
	}
	rootfs := filepath.Join(bundle, "rootfs")
	if err := mount.UnmountRecursive(rootfs, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("id", id).Warn("unmount rootfs")
	}
	if shareErr == nil {
		if err := os.RemoveAll(stateDir); err != nil {
			log.G(ctx).WithError(err).WithField("id", id).Warn("remove vm state")
		}
	}
	if created {
		// The box existed (its state directory outlives Create only on
		// success): its poststop hooks are due, as at Delete.
		runStalePoststop(ctx, id, bundle, vm.Pid)
	}
	return shim.StopStatus{Pid: vm.Pid, ExitStatus: exitStatusVMDied, ExitedAt: time.Now()}, nil
}

// socketDirLink is the link to the socket directory that containerd's shim
// library leaves in the bundle when the start action was given one.
const socketDirLink = "s"

// endLiveShim ends a shim that still serves box id's address. Its start
// action may have died after spawning it and before its caller learned the
// address (containerd then runs this delete action for the bundle once it
// restarts; the shim would otherwise serve, unreachable, forever); or the
// caller lost its connection to a shim that lives on. It is asked to shut
// down at once (its VM goes with it) and killed if it does not exit; its
// socket is removed. A pod member's address is its sandbox's shim, not its
// own to end. Only a shim that could not be killed is an error: one that
// does not say who it is is left to the rest of the delete action, as
// before.
func endLiveShim(ctx context.Context, id, bundle string) error {
	group, member, err := shimGroup(bundle, id)
	if err != nil || member {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	socketDir, err := os.Readlink(filepath.Join(bundle, socketDirLink))
	if err != nil {
		socketDir = filepath.Join(filepath.Dir(stateRoot), "s")
	}
	addr, err := shim.CreateSocketAddress(ctx, socketDir, os.Getenv("GRPC_ADDRESS"), group, false)
	if err != nil {
		return err
	}
	conn, err := shim.AnonDialer(addr, time.Second)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			// Nobody listens: a dead shim's socket.
			shim.RemoveSocket(addr)
		}
		return nil
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	task := taskAPI.NewTTRPCTaskClient(c)
	resp, err := task.Connect(ctx, &taskAPI.ConnectRequest{ID: id})
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("delete: a shim serves the box but does not answer Connect")
		return nil
	}
	pid, err := reaper.ReadIdentity(int(resp.GetShimPid()))
	if err != nil {
		return nil // gone meanwhile
	}
	log.G(ctx).WithField("id", id).WithField("pid", pid.Pid).Warn("delete: ending the shim still serving the box")
	if _, err := task.Shutdown(ctx, &taskAPI.ShutdownRequest{ID: id, Now: true}); err != nil && !errors.Is(err, ttrpc.ErrClosed) {
		log.G(ctx).WithError(err).WithField("id", id).Warn("shutdown of the live shim")
	}
	deadline, _ := ctx.Deadline()
	if out, _, err := reaper.Default().Reap(pid.Pid, deadline); err != nil || out == reaper.TimedOut {
		if err := pid.Signal(unix.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if out, _, err := reaper.Default().Reap(pid.Pid, time.Now().Add(stopTimeout)); err != nil || out == reaper.TimedOut {
			return fmt.Errorf("shim pid %d still alive after SIGKILL: %w", pid.Pid, errdefs.ErrUnavailable)
		}
	}
	shim.RemoveSocket(addr)
	return nil
}

// Info describes the runtime and what it supports, as the runc shim's does
// from `runc features`: containerd's CRI reads the mount options from it
// (recursive read-only mounts are offered to pods only when "rro" is
// there).
func (m manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	f, err := typeurl.MarshalAnyToProto(runtimeFeatures())
	if err != nil {
		return nil, err
	}
	return &types.RuntimeInfo{Name: m.name, Features: f}, nil
}

// runtimeFeatures is what a box honours of the OCI runtime spec. The mount
// options are those the guest's runtime applies plus what the share does
// on the host: rro reaches the host's submounts through the share, and
// the propagation options are accepted (rslave's host-to-guest half works;
// see docs/design.md). Hooks are the ones run on the host; user namespace
// mappings of mounts (idmap) are not offered.
func runtimeFeatures() *features.Features {
	return &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		Hooks:         []string{hookPrestart, hookCreateRuntime, hookPoststart, hookPoststop},
		MountOptions: []string{
			"async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "iversion",
			"lazytime", "loud", "mand", "noatime", "nodev", "nodiratime", "noexec", "noiversion",
			"nolazytime", "nomand", "norelatime", "nostrictatime", "nosuid", "private", "rbind",
			"relatime", "remount", "ro", "rprivate", "rro", "rshared", "rslave", "runbindable",
			"rw", "shared", "silent", "slave", "strictatime", "suid", "sync", "unbindable",
		},
		Linux: &features.Linux{
			Namespaces: []string{"cgroup", "ipc", "mount", "network", "pid", "uts"},
		},
	}
}

// dirExists says path is a directory.
func dirExists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.IsDir()
}

// runStalePoststop runs the poststop hooks of the bundle's spec for a box
// whose shim is gone; failures are logged.
func runStalePoststop(ctx context.Context, id, bundle string, pid int) {
	_, spec, err := readSpec(bundle)
	if err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("read spec for poststop hooks")
		return
	}
	c := &container{id: id, bundle: bundle, ociSpec: spec}
	c.runHooks(ctx, pid, hookPoststop)
}
