package shim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/boxlite/boxlite/pkg/agent/api"
	guestvm "github.com/boxlite/boxlite/pkg/sandbox"
)

var (
	_ taskAPI.TTRPCTaskService = (*service)(nil)
	_ shim.TTRPCService        = (*service)(nil)
)

// service is the Task v3 service of one shim: one sandbox (one VM) and its
// containers, a single-container box or a pod's pause and app containers.
type service struct {
	events   *publisher
	shutdown shutdown.Service

	// createMu serialises Create: a sandbox boots once, and containers
	// join it one at a time.
	createMu sync.Mutex

	// mu guards sb and containers.
	mu sync.Mutex
	// sb is the shim's sandbox, nil before the first Create. Guarded by mu.
	sb *sandbox
	// containers are the sandbox's containers by id, until deleted.
	// Guarded by mu.
	containers map[string]*container
}

// NewTaskService returns the Task v3 service; the shim library serves it.
func NewTaskService(ctx context.Context, pub shim.Publisher, sd shutdown.Service) (taskAPI.TTRPCTaskService, error) {
	ns, _ := namespaces.Namespace(ctx)
	s := &service{events: newPublisher(ns, pub), shutdown: sd, containers: map[string]*container{}}
	sd.RegisterCallback(func(context.Context) error {
		s.events.close()
		return nil
	})
	return s, nil
}

// RegisterTTRPC registers the task service with the shim's server.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// getContainer returns container id and the sandbox it runs in.
func (s *service) getContainer(id string) (*sandbox, *container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok {
		return nil, nil, fmt.Errorf("task %s: %w", id, errdefs.ErrNotFound)
	}
	return s.sb, c, nil
}

// getProcess returns a process of container id.
func (s *service) getProcess(id, execID string) (*sandbox, *container, *process, error) {
	sb, c, err := s.getContainer(id)
	if err != nil {
		return nil, nil, nil, err
	}
	p, err := c.process(execID)
	return sb, c, p, err
}

// containerList returns the sandbox's containers.
func (s *service) containerList() []*container {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		out = append(out, c)
	}
	return out
}

// findContainer returns container id, or nil.
func (s *service) findContainer(id string) *container {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.containers[id]
}

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
		})
		go sb.exits.pollGuest(sb.vm.Agent(), sb.vm.Done(), s.findContainer)
	}
	s.events.send(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint,
		IO:  &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid: sb.pid(),
	})
	return &taskAPI.CreateTaskResponse{Pid: sb.pid()}, nil
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
	return &container{id: r.ID, ns: ns, bundle: r.Bundle, role: role, sandboxID: sbID, spec: specData, ociSpec: spec,
		execs: map[string]*process{}}, nil
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
	if p.execID == "" {
		if c.isSandbox() {
			if err := sb.startNetwork(ctx); err != nil {
				return err
			}
		}
		if _, err := a.StartContainer(ctx, &api.ContainerRequest{Id: c.id}); err != nil {
			return fmt.Errorf("start %s: %w", c.id, err)
		}
		return nil
	}
	rl, err := openRelay(ctx, p.stdio, c.ns, c.id)
	if err != nil {
		return err
	}
	if _, err := a.ExecProcess(ctx, &api.ExecProcessRequest{
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

// Exec adds an exec process; Start runs it.
func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	_, c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if st, _ := c.init.current(); st != stateRunning && st != statePaused {
		return nil, errgrpc.ToGRPC(fmt.Errorf("cannot exec in %s in %s state: %w", r.ID, st, errdefs.ErrFailedPrecondition))
	}
	if r.ExecID == "" || r.Spec == nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec needs an id and a process: %w", errdefs.ErrInvalidArgument))
	}
	c.mu.Lock()
	if _, ok := c.execs[r.ExecID]; ok {
		c.mu.Unlock()
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: %w", r.ExecID, errdefs.ErrAlreadyExists))
	}
	c.execs[r.ExecID] = newProcess(r.ID, r.ExecID,
		stdioConfig{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}, r.Spec.Value)
	c.mu.Unlock()
	s.events.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return &emptypb.Empty{}, nil
}

// Kill signals a process. An exited process is NotFound, as with runc.
func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	sb, c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if !live(p) || !sb.alive() {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s already finished: %w", p.name(), errdefs.ErrNotFound))
	}
	if _, err := sb.vm.Agent().SignalProcess(ctx, &api.SignalProcessRequest{
		Id: c.id, ExecId: r.ExecID, Signal: r.Signal, All: r.All,
	}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("kill %s: %w", p.name(), err))
	}
	return &emptypb.Empty{}, nil
}

// Wait blocks until the process exits.
func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, _, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	e, err := p.wait(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.WaitResponse{ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at)}, nil
}

// State reports a process's status and stdio.
func (s *service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	sb, c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	st, e := p.current()
	resp := &taskAPI.StateResponse{
		ID: c.id, ExecID: r.ExecID, Bundle: c.bundle, Pid: sb.pid(), Status: st.taskStatus(),
		Stdin: p.stdio.stdin, Stdout: p.stdio.stdout, Stderr: p.stdio.stderr, Terminal: p.stdio.terminal,
	}
	if st == stateStopped || st == stateDeleted {
		resp.ExitStatus, resp.ExitedAt = e.status, protobuf.ToTimestamp(e.at)
	}
	return resp, nil
}

// runningIn returns the sandbox and container id for a call that needs the
// guest: NotFound when the task is unknown, FailedPrecondition when its VM
// is gone.
func (s *service) runningIn(id string) (*sandbox, *container, error) {
	sb, c, err := s.getContainer(id)
	if err != nil {
		return nil, nil, err
	}
	if !sb.alive() {
		return nil, nil, fmt.Errorf("task %s: its VM is gone: %w", id, errdefs.ErrFailedPrecondition)
	}
	return sb, c, nil
}

// Pids lists the processes of a container (guest pids).
func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	sb, c, err := s.runningIn(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := sb.vm.Agent().ListPids(ctx, &api.ContainerRequest{Id: c.id})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	out := &taskAPI.PidsResponse{}
	for _, pid := range resp.Pids {
		out.Processes = append(out.Processes, &task.ProcessInfo{Pid: pid})
	}
	return out, nil
}

// Pause freezes a container.
func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return s.freeze(ctx, r.ID, "pause", statePaused, stateRunning)
}

// Resume thaws a container.
func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return s.freeze(ctx, r.ID, "resume", stateRunning, statePaused)
}

// freeze pauses (to paused) or resumes (to running) a container in the
// guest, then moves its init to the new state.
func (s *service) freeze(ctx context.Context, id, verb string, to, from procState) (*emptypb.Empty, error) {
	sb, c, err := s.runningIn(id)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p := c.init
	p.op.Lock()
	defer p.op.Unlock()
	if err := p.require(verb, from); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	a, req := sb.vm.Agent(), &api.ContainerRequest{Id: c.id}
	if to == statePaused {
		_, err = a.Pause(ctx, req)
	} else {
		_, err = a.Resume(ctx, req)
	}
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("%s %s: %w", verb, c.id, err))
	}
	if err := p.transition(verb, to, from); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if to == statePaused {
		s.events.send(&eventstypes.TaskPaused{ContainerID: c.id})
	} else {
		s.events.send(&eventstypes.TaskResumed{ContainerID: c.id})
	}
	return &emptypb.Empty{}, nil
}

// CloseIO closes a process's stdin.
func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	sb, c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if rl := p.getRelay(); rl != nil && r.Stdin && sb.vm != nil {
		rl.closeStdin(sb.vm.Agent(), c.id, r.ExecID)
	}
	return &emptypb.Empty{}, nil
}

// ResizePty resizes a process's terminal.
func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	sb, c, err := s.runningIn(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := c.process(r.ExecID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := sb.vm.Agent().ResizePty(ctx, &api.ResizePtyRequest{Id: c.id, ExecId: r.ExecID, Width: r.Width, Height: r.Height}); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

// Checkpoint is not supported.
func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("checkpoint: %w", errdefs.ErrNotImplemented))
}

// Update is not supported yet: resources are fixed at Create.
func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("update: %w", errdefs.ErrNotImplemented))
}

// Connect returns the shim's pid and the task's (the VMM's) pid.
func (s *service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}
	if sb, _, err := s.getContainer(r.ID); err == nil {
		resp.TaskPid = sb.pid()
	}
	return resp, nil
}

// Shutdown ends the shim once every container is deleted, or at once with
// Now (the VM killed and reaped first). containerd sends it after each
// delete; while a container of the sandbox remains it is ignored.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	sb, left := s.sb, len(s.containers)
	s.mu.Unlock()
	if left > 0 && !r.Now {
		return &emptypb.Empty{}, nil
	}
	if sb != nil && r.Now {
		if err := sb.kill(); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		if err := sb.teardown(ctx); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		var errs []error
		for _, c := range s.containerList() {
			c.closeRelays()
			errs = append(errs, c.unmountRootfs())
		}
		if err := errors.Join(errs...); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	s.shutdown.Shutdown()
	return &emptypb.Empty{}, nil
}
