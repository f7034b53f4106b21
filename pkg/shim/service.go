package shim

import (
	"context"
	"encoding/json"
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
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/boxlite/boxlite/pkg/agent/api"
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
	// join it one at a time. Shutdown takes it too, so the shim never
	// exits in the middle of a Create.
	createMu sync.Mutex

	// mu guards sb, containers, creating and closing.
	mu sync.Mutex
	// creating cancels the Create in progress; nil when none. Guarded
	// by mu.
	creating context.CancelCauseFunc
	// closing says Shutdown is ending the shim: no Create may begin.
	// Guarded by mu.
	closing bool
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
	// A SIGKILL of the box's own process ends the box within
	// killAgentTimeout whatever the guest does, as under runc: a guest that
	// does not answer (its agent hung, the VM frozen) or never reports the
	// exit has its VM killed, and the process dies with it.
	killsBox := r.Signal == uint32(unix.SIGKILL) && r.ExecID == "" && c.id == sb.id
	actx := ctx
	var ended <-chan struct{}
	if killsBox {
		deadline := time.Now().Add(killAgentTimeout)
		ended = sb.endBy(p, deadline)
		var cancel context.CancelFunc
		actx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	if _, err := sb.vm.Agent().SignalProcess(actx, &api.SignalProcessRequest{
		Id: c.id, ExecId: r.ExecID, Signal: r.Signal, All: r.All,
	}); err != nil {
		if !killsBox || actx.Err() == nil || ctx.Err() != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("kill %s: %w", p.name(), err))
		}
		// The guest did not answer by the deadline: endBy kills the VM.
		<-ended
	}
	return &emptypb.Empty{}, nil
}

// endBy makes sure p, SIGKILLed through the guest, is gone by deadline: if
// it has not been reported exited by then (the guest did not answer, lost
// it, or lies), the VM is killed. A process that dies of SIGKILL is
// reported in milliseconds. The channel is closed once p exited or the VM
// was killed.
func (sb *sandbox) endBy(p *process, deadline time.Time) <-chan struct{} {
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		if _, err := p.wait(ctx); err == nil || !live(p) || !sb.alive() {
			return
		}
		log.L.WithField("id", sb.id).Warnf("%s not reported exited within %v of SIGKILL: killing the VM", p.name(), killAgentTimeout)
		if err := sb.kill(); err != nil {
			log.L.WithError(err).WithField("id", sb.id).Warn("kill the VM")
		}
	}()
	return ended
}

// killAgentTimeout bounds how long a SIGKILL of a box's own process waits
// for the guest before the shim kills the VM instead. A live agent answers
// in milliseconds, even under TCG on a loaded host.
const killAgentTimeout = 10 * time.Second

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

// Update changes a container's cgroup limits in the guest (memory, CPU,
// pids, ...). The VM's own size is fixed at boot: a memory limit above
// what the VM can give the container is refused, naming both sizes.
func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	sb, c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	res, err := decodeResources(r.Resources)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := sb.fits(res); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("update %s: %w", c.id, err))
	}
	data, err := json.Marshal(res)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := sb.vm.Agent().UpdateContainer(ctx, &api.UpdateContainerRequest{Id: c.id, Resources: data}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("update %s in the guest: %w", c.id, err))
	}
	return &emptypb.Empty{}, nil
}

// decodeResources reads an update's resources: an OCI LinuxResources, as
// containerd's client (WithResources) and CRI send them.
func decodeResources(a *anypb.Any) (*specs.LinuxResources, error) {
	if a == nil {
		return nil, fmt.Errorf("update carries no resources: %w", errdefs.ErrInvalidArgument)
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return nil, fmt.Errorf("update resources of type %s: %v: %w", a.GetTypeUrl(), err, errdefs.ErrInvalidArgument)
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return nil, fmt.Errorf("update resources of type %s: want an OCI LinuxResources: %w", a.GetTypeUrl(), errdefs.ErrInvalidArgument)
	}
	return res, nil
}

// fits refuses resources the VM cannot provide: a memory limit (or
// reservation) above the VM's memory less what the guest itself needs.
func (sb *sandbox) fits(res *specs.LinuxResources) error {
	mem := res.Memory
	if mem == nil {
		return nil
	}
	room := int64(sb.memoryMiB-guestOverheadMiB) << 20
	for _, v := range []struct {
		name  string
		value *int64
	}{{"memory limit", mem.Limit}, {"memory reservation", mem.Reservation}} {
		if v.value != nil && *v.value > room {
			return fmt.Errorf("%s of %d MiB exceeds what the box's VM can hold: %d MiB of its %d MiB (the VM's size is set when it boots: give the limit at create, or set %s): %w",
				v.name, *v.value>>20, room>>20, sb.memoryMiB, AnnotationMemory, errdefs.ErrFailedPrecondition)
		}
	}
	return nil
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
//
// A Create still in progress when the shim ends was abandoned by its
// caller (containerd shuts the shim down after a Create it gave up on, the
// manager's rm --force of a booting box sends Now): it is cancelled, and
// the shim ends only once its undo has run. Exiting mid-boot would leave
// the VM's state directory, its mounts and network wiring behind.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	left := len(s.containers)
	if left > 0 && !r.Now {
		s.mu.Unlock()
		return &emptypb.Empty{}, nil
	}
	s.closing = true
	if s.creating != nil {
		s.creating(errCreateAbandoned)
	}
	s.mu.Unlock()
	s.createMu.Lock()
	defer s.createMu.Unlock()
	s.mu.Lock()
	// A Create that completed before its cancellation took effect made a
	// container nobody will delete: it goes with the shim.
	sb, kill := s.sb, r.Now || len(s.containers) > left
	s.mu.Unlock()
	if sb != nil && kill {
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
