package shim

import (
	"context"
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
	"github.com/boxlite/boxlite/pkg/vmm"
)

var (
	_ taskAPI.TTRPCTaskService = (*service)(nil)
	_ shim.TTRPCService        = (*service)(nil)
)

// service is the Task v3 service of one shim, serving one box.
type service struct {
	events   *publisher
	shutdown shutdown.Service

	// mu guards box.
	mu sync.Mutex
	// box is the shim's box, nil before Create and after Delete. Guarded by mu.
	box *box
	// deleted says the box was created and then deleted. Guarded by mu.
	deleted bool
}

// NewTaskService returns the Task v3 service; the shim library serves it.
func NewTaskService(ctx context.Context, pub shim.Publisher, sd shutdown.Service) (taskAPI.TTRPCTaskService, error) {
	ns, _ := namespaces.Namespace(ctx)
	s := &service{events: newPublisher(ns, pub), shutdown: sd}
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

// getBox returns the box named id.
func (s *service) getBox(id string) (*box, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.box == nil || s.box.id != id {
		return nil, fmt.Errorf("task %s: %w", id, errdefs.ErrNotFound)
	}
	return s.box, nil
}

// getProcess returns a process of box id.
func (s *service) getProcess(id, execID string) (*box, *process, error) {
	b, err := s.getBox(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := b.process(execID)
	return b, p, err
}

// Create boots the box's VM and creates its container in the guest. On any
// failure nothing is left: the VM is killed and reaped, mounts undone.
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
	s.mu.Lock()
	if s.box != nil || s.deleted {
		s.mu.Unlock()
		return nil, fmt.Errorf("this shim already serves a box: %w", errdefs.ErrAlreadyExists)
	}
	s.mu.Unlock()
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
	rootfs, mounted, err := prepareRootfs(r.Bundle, spec, r.Rootfs)
	if err != nil {
		return nil, err
	}
	b := &box{id: r.ID, ns: ns, bundle: r.Bundle, spec: specData, ociSpec: spec, rootfs: rootfs, mounted: mounted,
		stateDir: boxStateDir(ns, r.ID), execs: map[string]*process{}}
	defer func() {
		if retErr != nil {
			if b.init != nil {
				if rl := b.init.getRelay(); rl != nil {
					rl.abort()
				}
			}
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*stopTimeout)
			if err := b.teardown(cctx); err != nil {
				log.G(ctx).WithError(err).WithField("id", r.ID).Error("clean up failed create")
			}
			cancel()
		}
	}()
	shared, err := bootBox(ctx, b, r.Options)
	if err != nil {
		return nil, err
	}
	stdio := stdioConfig{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	b.init = newProcess(r.ID, "", stdio, nil)
	rl, err := openRelay(ctx, stdio, ns, r.ID)
	if err != nil {
		return nil, err
	}
	b.init.setRelay(rl)
	c := b.sb.Agent()
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{
		Id: r.ID, Spec: specData, ShareTag: vmm.ShareTag, Rootfs: shared.rootfs, SharedMounts: shared.mounts,
		Stdio: stdio.agentStdio(),
	}); err != nil {
		return nil, fmt.Errorf("create %s in the guest: %w", r.ID, errgrpc.ToNative(err))
	}
	// The container's namespaces exist and QEMU runs in the box's
	// network namespace: the hooks that configure it run now, before
	// the process does.
	if err := b.runHooks(ctx, hookPrestart, hookCreateRuntime); err != nil {
		return nil, err
	}
	rl.start(c, r.ID, "")
	s.mu.Lock()
	s.box = b
	s.mu.Unlock()
	go s.watchGuest(b)
	s.events.send(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint,
		IO:  &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid: b.vmmPid(),
	})
	return &taskAPI.CreateTaskResponse{Pid: b.vmmPid()}, nil
}

// Start starts the box's init or a created exec.
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	b, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := p.transition("start", stateRunning, stateCreated); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := s.startProcess(ctx, b, p); err != nil {
		p.setExited(exitInfo{status: 255, at: time.Now()})
		p.markStarted()
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID == "" {
		s.events.send(&eventstypes.TaskStart{ContainerID: b.id, Pid: b.vmmPid()})
		s.startHealth(b)
		b.runHooks(ctx, hookPoststart)
	} else {
		s.events.send(&eventstypes.TaskExecStarted{ContainerID: b.id, ExecID: r.ExecID, Pid: b.vmmPid()})
	}
	p.markStarted()
	return &taskAPI.StartResponse{Pid: b.vmmPid()}, nil
}

func (s *service) startProcess(ctx context.Context, b *box, p *process) error {
	c := b.sb.Agent()
	if p.execID == "" {
		if err := b.startNetwork(ctx); err != nil {
			return err
		}
		if _, err := c.StartContainer(ctx, &api.ContainerRequest{Id: b.id}); err != nil {
			return fmt.Errorf("start %s: %w", b.id, errgrpc.ToNative(err))
		}
		return nil
	}
	rl, err := openRelay(ctx, p.stdio, b.ns, b.id)
	if err != nil {
		return err
	}
	if _, err := c.ExecProcess(ctx, &api.ExecProcessRequest{
		Id: b.id, ExecId: p.execID, Process: p.spec, Stdio: p.stdio.agentStdio(),
	}); err != nil {
		// The exec never ran: its logger has nothing to flush.
		rl.abort()
		return fmt.Errorf("exec %s in %s: %w", p.execID, b.id, errgrpc.ToNative(err))
	}
	p.setRelay(rl)
	rl.start(c, b.id, p.execID)
	return nil
}

// Delete deletes an exited exec, or the box: its container, its VM (reaped
// before anything is removed), its mounts and state.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	b, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := p.transition("delete", stateDeleted, stateCreated, stateStopped); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	_, e := p.current()
	if e.at.IsZero() {
		e.at = time.Now()
	}
	if r.ExecID != "" {
		if rl := p.getRelay(); rl != nil {
			rl.close()
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		b.sb.Agent().DeleteProcess(dctx, &api.ProcessRequest{Id: b.id, ExecId: r.ExecID})
		cancel()
		b.mu.Lock()
		delete(b.execs, r.ExecID)
		b.mu.Unlock()
	} else {
		if err := b.teardown(ctx); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		s.mu.Lock()
		s.box, s.deleted = nil, true
		s.mu.Unlock()
		b.runHooks(ctx, hookPoststop)
		s.events.send(&eventstypes.TaskDelete{ContainerID: b.id, Pid: b.vmmPid(), ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at)})
	}
	return &taskAPI.DeleteResponse{Pid: b.vmmPid(), ExitStatus: e.status, ExitedAt: protobuf.ToTimestamp(e.at)}, nil
}

// Exec adds an exec process; Start runs it.
func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	b, err := s.getBox(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if st, _ := b.init.current(); st != stateRunning && st != statePaused {
		return nil, errgrpc.ToGRPC(fmt.Errorf("cannot exec in %s in %s state: %w", r.ID, st, errdefs.ErrFailedPrecondition))
	}
	if r.ExecID == "" || r.Spec == nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec needs an id and a process: %w", errdefs.ErrInvalidArgument))
	}
	b.mu.Lock()
	if _, ok := b.execs[r.ExecID]; ok {
		b.mu.Unlock()
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: %w", r.ExecID, errdefs.ErrAlreadyExists))
	}
	b.execs[r.ExecID] = newProcess(r.ID, r.ExecID,
		stdioConfig{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}, r.Spec.Value)
	b.mu.Unlock()
	s.events.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return &emptypb.Empty{}, nil
}

// Kill signals a process. An exited process is NotFound, as with runc.
func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	b, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	switch st, _ := p.current(); st {
	case stateStopped, stateDeleted:
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s already finished: %w", p.name(), errdefs.ErrNotFound))
	}
	if _, err := b.sb.Agent().SignalProcess(ctx, &api.SignalProcessRequest{
		Id: b.id, ExecId: r.ExecID, Signal: r.Signal, All: r.All,
	}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("kill %s: %w", p.name(), errgrpc.ToNative(err)))
	}
	return &emptypb.Empty{}, nil
}

// Wait blocks until the process exits.
func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
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
	b, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	st, e := p.current()
	resp := &taskAPI.StateResponse{
		ID: b.id, ExecID: r.ExecID, Bundle: b.bundle, Pid: b.vmmPid(), Status: st.taskStatus(),
		Stdin: p.stdio.stdin, Stdout: p.stdio.stdout, Stderr: p.stdio.stderr, Terminal: p.stdio.terminal,
	}
	if st == stateStopped || st == stateDeleted {
		resp.ExitStatus, resp.ExitedAt = e.status, protobuf.ToTimestamp(e.at)
	}
	return resp, nil
}

// Pids lists the processes in the box (guest pids).
func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	b, err := s.getBox(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := b.sb.Agent().ListPids(ctx, &api.ContainerRequest{Id: b.id})
	if err != nil {
		return nil, errgrpc.ToGRPC(errgrpc.ToNative(err))
	}
	out := &taskAPI.PidsResponse{}
	for _, pid := range resp.Pids {
		out.Processes = append(out.Processes, &task.ProcessInfo{Pid: pid})
	}
	return out, nil
}

// Pause freezes the box's container.
func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	b, err := s.getBox(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := b.init.transition("pause", statePaused, stateRunning); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := b.sb.Agent().Pause(ctx, &api.ContainerRequest{Id: b.id}); err != nil {
		b.init.transition("undo pause", stateRunning, statePaused)
		return nil, errgrpc.ToGRPC(errgrpc.ToNative(err))
	}
	s.events.send(&eventstypes.TaskPaused{ContainerID: b.id})
	return &emptypb.Empty{}, nil
}

// Resume thaws the box's container.
func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	b, err := s.getBox(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := b.init.transition("resume", stateRunning, statePaused); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := b.sb.Agent().Resume(ctx, &api.ContainerRequest{Id: b.id}); err != nil {
		b.init.transition("undo resume", statePaused, stateRunning)
		return nil, errgrpc.ToGRPC(errgrpc.ToNative(err))
	}
	s.events.send(&eventstypes.TaskResumed{ContainerID: b.id})
	return &emptypb.Empty{}, nil
}

// CloseIO closes a process's stdin.
func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	b, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if rl := p.getRelay(); rl != nil && r.Stdin {
		rl.closeStdin(b.sb.Agent(), b.id, r.ExecID)
	}
	return &emptypb.Empty{}, nil
}

// ResizePty resizes a process's terminal.
func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	b, _, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := b.sb.Agent().ResizePty(ctx, &api.ResizePtyRequest{Id: b.id, ExecId: r.ExecID, Width: r.Width, Height: r.Height}); err != nil {
		return nil, errgrpc.ToGRPC(errgrpc.ToNative(err))
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
	if b, err := s.getBox(r.ID); err == nil {
		resp.TaskPid = b.vmmPid()
	}
	return resp, nil
}

// Shutdown ends the shim once its box is deleted (or at once with Now): the
// VM is killed and reaped first.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	b := s.box
	s.mu.Unlock()
	if b != nil {
		if !r.Now {
			return &emptypb.Empty{}, nil
		}
		if b.sb != nil {
			if err := b.sb.Kill(); err != nil {
				return nil, errgrpc.ToGRPC(err)
			}
		}
		if err := b.teardown(ctx); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	s.shutdown.Shutdown()
	return &emptypb.Empty{}, nil
}
