package shim

import (
	"context"
	"errors"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/agent/api"
	guestvm "github.com/boxlite/boxlite/pkg/sandbox"
)

// Create creates a container: a box or a pod's sandbox container boots the
// VM; a pod's app container joins the running VM of its sandbox. On any
// failure nothing is left: a VM booted for it is killed and reaped, its
// files leave the share, mounts are undone.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	resp, err := s.create(ctx, r)
	return resp, errgrpc.ToGRPC(err)
}

func (s *service) create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if r.ID == "" || r.Bundle == "" {
		return nil, fmt.Errorf("create needs an id and a bundle: %w", errdefs.ErrInvalidArgument)
	}
	if r.Checkpoint != "" {
		return nil, fmt.Errorf("restore from checkpoint: %w", errdefs.ErrNotImplemented)
	}
	s.createMu.Lock()
	defer s.createMu.Unlock()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if err := s.beginCreate(cancel); err != nil {
		return nil, err
	}
	defer s.endCreate()
	defer func() {
		// Whatever failed failed because the boot was cancelled: the
		// cancellation is the error.
		if retErr != nil && errors.Is(context.Cause(ctx), errCreateAbandoned) {
			retErr = fmt.Errorf("create %s: %w", r.ID, errCreateAbandoned)
		}
	}()
	c, err := newContainer(ctx, r)
	if err != nil {
		return nil, err
	}
	sb, err := s.sandboxFor(c)
	if err != nil {
		return nil, err
	}
	if c.rootfs, c.mounted, err = prepareRootfs(r.Bundle, c.ociSpec, r.Rootfs); err != nil {
		return nil, err
	}
	var undo cleanups
	defer func() {
		if retErr != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*stopTimeout)
			undo.run(cctx, c.id)
			cancel()
		}
	}()
	undo.add("unmount rootfs", func(context.Context) error { return c.unmountRootfs() })
	if c.isSandbox() {
		undo.add("tear the sandbox down", sb.teardown)
		if err := sb.boot(ctx, c, r.Options); err != nil {
			return nil, err
		}
	} else {
		undo.add("take the container out of the share", func(context.Context) error { return sb.removeContainer(c) })
	}
	if err := s.createInGuest(ctx, sb, c, r, &undo); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if c.isSandbox() {
		s.sb = sb
	}
	s.containers[c.id] = c
	s.mu.Unlock()
	if c.isSandbox() {
		sb.exits = newExitLoop(s.events, sb.pid(), sb.vm.OOMKilled, s.containerList, func(ic *container) {
			if ic.isSandbox() {
				sb.stopHealth()
			}
		}, sb.vm.ConsoleTail)
		go sb.exits.pollGuest(sb.vm.Agent(), sb.vm.Done(), s.findContainer)
	}
	s.events.send(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint,
		IO:  &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid: sb.pid(),
	})
	return &taskAPI.CreateTaskResponse{Pid: sb.pid()}, nil
}

// errCreateAbandoned is why a Create is cancelled: Shutdown ended the shim
// while it ran.
var errCreateAbandoned = fmt.Errorf("the shim was shut down while the task was being created: %w", errdefs.ErrAborted)

// beginCreate records how to cancel the Create that holds createMu, or
// refuses it once Shutdown is ending the shim.
func (s *service) beginCreate(cancel context.CancelCauseFunc) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return fmt.Errorf("the shim is shutting down: %w", errdefs.ErrFailedPrecondition)
	}
	s.creating = cancel
	return nil
}

// endCreate forgets the Create that ends.
func (s *service) endCreate() {
	s.mu.Lock()
	s.creating = nil
	s.mu.Unlock()
}

// newContainer reads and checks the bundle of a container to create.
func newContainer(ctx context.Context, r *taskAPI.CreateTaskRequest) (*container, error) {
	ns, _ := namespaces.Namespace(ctx)
	specData, spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	if specData, err = withHostHostname(specData, spec); err != nil {
		return nil, err
	}
	if err := checkHooks(spec); err != nil {
		return nil, err
	}
	role, sbID, err := roleOf(r.ID, spec)
	if err != nil {
		return nil, err
	}
	opts, err := parseTaskOptions(r.Options)
	if err != nil {
		return nil, err
	}
	return &container{id: r.ID, ns: ns, bundle: r.Bundle, role: role, sandboxID: sbID, spec: specData, ociSpec: spec,
		opts: opts, execs: map[string]*process{}}, nil
}

// sandboxFor returns the sandbox c runs in: a new one for a box or a pod's
// sandbox container, the running one for a pod's app container.
func (s *service) sandboxFor(c *container) (*sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.containers[c.id]; ok {
		return nil, fmt.Errorf("task %s: %w", c.id, errdefs.ErrAlreadyExists)
	}
	if c.isSandbox() {
		if s.sb != nil {
			return nil, fmt.Errorf("this shim already serves sandbox %s: %w", s.sb.id, errdefs.ErrAlreadyExists)
		}
		return newSandbox(c), nil
	}
	sbID := c.sandboxID
	if s.sb == nil || s.sb.id != sbID {
		return nil, fmt.Errorf("container %s belongs to pod sandbox %s, which this shim does not run (create the sandbox container first): %w", c.id, sbID, errdefs.ErrNotFound)
	}
	if !s.sb.alive() {
		return nil, fmt.Errorf("the VM of pod sandbox %s is gone: %w", sbID, errdefs.ErrFailedPrecondition)
	}
	return s.sb, nil
}

// createInGuest shares c's files with the running VM, opens its stdio and
// creates it in the guest, then runs its prestart and createRuntime hooks.
func (s *service) createInGuest(ctx context.Context, sb *sandbox, c *container, r *taskAPI.CreateTaskRequest, undo *cleanups) error {
	shared, err := sb.addContainer(c)
	if err != nil {
		return err
	}
	stdio := stdioConfig{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	c.init = newProcess(c.id, "", stdio, nil)
	rl, err := openRelay(ctx, stdio, c.ns, c.id)
	if err != nil {
		return err
	}
	// A container that never ran: its logger has nothing to flush.
	undo.add("close stdio", func(context.Context) error { rl.abort(); return nil })
	c.init.setRelay(rl)
	a := sb.vm.Agent()
	sbID, joins, shm := c.podRequest()
	if _, err := a.CreateContainer(ctx, &api.CreateContainerRequest{
		Id: c.id, Spec: c.spec, ShareTag: guestvm.ShareTag, Rootfs: shared.rootfs, SharedMounts: shared.mounts,
		Stdio: stdio.agentStdio(), SandboxId: sbID, JoinNamespaces: joins, PodShmMounts: shm,
		NoNewKeyring: c.opts.noNewKeyring, NoPivotRoot: c.opts.noPivotRoot,
	}); err != nil {
		return fmt.Errorf("create %s in the guest: %w", c.id, err)
	}
	if !c.isSandbox() {
		undo.add("delete the container in the guest", func(ctx context.Context) error {
			_, err := a.DeleteContainer(ctx, &api.DeleteContainerRequest{Id: c.id})
			return err
		})
	}
	// The container's namespaces exist and QEMU runs in the box's
	// network namespace: the hooks that configure it run now, before
	// the process does.
	if err := c.runHooks(ctx, int(sb.pid()), hookPrestart, hookCreateRuntime); err != nil {
		return err
	}
	rl.start(a, c.id, "")
	return nil
}

// Start starts a container's init or a created exec. A Start whose work
// failed leaves the process created: it can be deleted (or started again).
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	sb, c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p.op.Lock()
	defer p.op.Unlock()
	if err := p.require("start", stateCreated); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p.beginStart()
	defer p.endStart()
	if err := s.startProcess(ctx, sb, c, p); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := p.transition("start", stateRunning, stateCreated); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID == "" {
		s.events.send(&eventstypes.TaskStart{ContainerID: c.id, Pid: sb.pid()})
		if c.isSandbox() {
			sb.startHealth(s.events)
		}
		c.runHooks(ctx, int(sb.pid()), hookPoststart)
	} else {
		s.events.send(&eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: sb.pid()})
	}
	return &taskAPI.StartResponse{Pid: sb.pid()}, nil
}

func (s *service) startProcess(ctx context.Context, sb *sandbox, c *container, p *process) error {
	if !sb.alive() {
		return fmt.Errorf("start %s: the VM is gone: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	a := sb.vm.Agent()
	// The guest acts on a start it was sent whether or not our caller
	// still waits (containerd restarted: ttrpc cancelled the call when its
	// connection closed). The agent call is detached from that, bounded by
	// the agent's own deadline, so the state records what the guest did:
	// a cancelled call left the task created while its process ran.
	gctx := context.WithoutCancel(ctx)
	if p.execID == "" {
		if c.isSandbox() {
			if err := sb.startNetwork(ctx); err != nil {
				return err
			}
		}
		if _, err := a.StartContainer(gctx, &api.ContainerRequest{Id: c.id}); err != nil {
			return fmt.Errorf("start %s: %w", c.id, err)
		}
		return nil
	}
	rl, err := openRelay(ctx, p.stdio, c.ns, c.id)
	if err != nil {
		return err
	}
	if _, err := a.ExecProcess(gctx, &api.ExecProcessRequest{
		Id: c.id, ExecId: p.execID, Process: p.spec, Stdio: p.stdio.agentStdio(),
	}); err != nil {
		// The exec never ran: its logger has nothing to flush.
		rl.abort()
		return fmt.Errorf("exec %s in %s: %w", p.execID, c.id, err)
	}
	p.setRelay(rl)
	rl.start(a, c.id, p.execID)
	return nil
}

// Delete deletes an exited (or never started) exec or container. A
// container's Delete does its work first and changes state only once it
// succeeded, so a failed one can be retried: for the sandbox's own
// container it tears the sandbox down (the VM reaped before anything is
// removed); for a pod's app container it deletes it in the guest and takes
// its files out of the share, and the VM runs on.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	sb, c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p.op.Lock()
	defer p.op.Unlock()
	if err := p.require("delete", stateCreated, stateStopped); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID != "" {
		s.deleteExec(ctx, sb, c, p)
	} else if err := s.deleteContainer(ctx, sb, c); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	// Waiters of a process that never ran are released with its delete.
	p.setExited(exitInfo{at: time.Now()})
	_, e := p.current()
	if err := p.transition("delete", stateDeleted, stateCreated, stateStopped); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID == "" {
		s.mu.Lock()
		delete(s.containers, c.id)
		s.mu.Unlock()
		c.runHooks(ctx, int(sb.pid()), hookPoststop)
		s.events.send(&eventstypes.TaskDelete{ContainerID: c.id, Pid: sb.pid(), ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at)})
	}
	return &taskAPI.DeleteResponse{Pid: sb.pid(), ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at)}, nil
}

// deleteExec forgets an exec in the shim and the guest.
func (s *service) deleteExec(ctx context.Context, sb *sandbox, c *container, p *process) {
	if rl := p.getRelay(); rl != nil {
		rl.close()
	}
	if sb.alive() {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if _, err := sb.vm.Agent().DeleteProcess(dctx, &api.ProcessRequest{Id: c.id, ExecId: p.execID}); err != nil {
			log.G(ctx).WithError(err).WithField("id", c.id).WithField("exec_id", p.execID).Debug("delete exec in the guest")
		}
		cancel()
	}
	c.mu.Lock()
	delete(c.execs, p.execID)
	c.mu.Unlock()
}

// deleteContainer undoes what Create made for c.
func (s *service) deleteContainer(ctx context.Context, sb *sandbox, c *container) error {
	if c.isSandbox() {
		if err := sb.teardown(ctx); err != nil {
			return err
		}
	} else {
		if sb.alive() {
			if _, err := sb.vm.Agent().DeleteContainer(ctx, &api.DeleteContainerRequest{Id: c.id}); err != nil && !errdefs.IsNotFound(err) {
				return fmt.Errorf("delete %s in the guest: %w", c.id, err)
			}
		}
		if err := sb.removeContainer(c); err != nil {
			return err
		}
	}
	c.closeRelays()
	return c.unmountRootfs()
}
