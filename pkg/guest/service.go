package guest

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// service puts an Agent on the wire: it is the only place where errdefs
// errors become ttrpc statuses.
type service struct {
	// a does the work.
	a *Agent
}

var _ api.AgentService = (*service)(nil)

// NewService returns the agent API served by a.
func NewService(a *Agent) api.AgentService { return &service{a: a} }

var empty = &api.Empty{}

// wire converts an error for the wire and logs unexpected ones.
func wire(ctx context.Context, method string, err error) error {
	if err == nil {
		return nil
	}
	log.G(ctx).WithError(err).WithField("method", method).Debug("request failed")
	return errgrpc.ToGRPC(err)
}

// recoverPanics turns a panic in a request handler into an Internal error:
// a panic that escaped would kill PID 1, and with it the VM.
func recoverPanics(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (_ any, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.G(ctx).WithField("method", info.FullMethod).Errorf("panic: %v\n%s", r, debug.Stack())
			err = errgrpc.ToGRPC(fmt.Errorf("agent panic in %s: %v: %w", info.FullMethod, r, errdefs.ErrInternal))
		}
	}()
	return method(ctx, unmarshal)
}

func ms(v uint32) time.Duration { return time.Duration(v) * time.Millisecond }

// Ping answers once the agent serves requests.
func (s *service) Ping(ctx context.Context, req *api.PingRequest) (*api.PingResponse, error) {
	if req.HostTimeUnixNs != 0 {
		syncClock(time.Unix(0, req.HostTimeUnixNs))
	}
	if len(req.Entropy) > 0 {
		if err := s.a.Reseed(req.Entropy); err != nil {
			return nil, wire(ctx, "Ping", err)
		}
	}
	return s.a.Ping(ctx), nil
}

// CreateContainer creates a container; see Agent.Create.
func (s *service) CreateContainer(ctx context.Context, req *api.CreateContainerRequest) (*api.CreateContainerResponse, error) {
	pid, err := s.a.Create(ctx, req)
	if err != nil {
		return nil, wire(ctx, "CreateContainer", err)
	}
	return &api.CreateContainerResponse{Pid: pid}, nil
}

// ConfigureNetwork moves NICs into a created container's network namespace
// and configures them; see Agent.ConfigureNetwork.
func (s *service) ConfigureNetwork(ctx context.Context, req *api.ConfigureNetworkRequest) (*api.Empty, error) {
	return empty, wire(ctx, "ConfigureNetwork", s.a.ConfigureNetwork(ctx, req))
}

// StartContainer starts a created container.
func (s *service) StartContainer(ctx context.Context, req *api.ContainerRequest) (*api.StartContainerResponse, error) {
	pid, err := s.a.Start(ctx, req.GetId())
	if err != nil {
		return nil, wire(ctx, "StartContainer", err)
	}
	return &api.StartContainerResponse{Pid: pid}, nil
}

// ExecProcess starts an exec; see Agent.Exec.
func (s *service) ExecProcess(ctx context.Context, req *api.ExecProcessRequest) (*api.ExecProcessResponse, error) {
	pid, err := s.a.Exec(ctx, req)
	if err != nil {
		return nil, wire(ctx, "ExecProcess", err)
	}
	return &api.ExecProcessResponse{Pid: pid}, nil
}

// SignalProcess signals a process; see Agent.Signal.
func (s *service) SignalProcess(ctx context.Context, req *api.SignalProcessRequest) (*api.Empty, error) {
	return empty, wire(ctx, "SignalProcess", s.a.Signal(ctx, req))
}

// WaitProcess returns a process's exit, waiting up to wait_ms.
func (s *service) WaitProcess(ctx context.Context, req *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
	resp, err := s.a.Wait(ctx, req.GetId(), req.GetExecId(), ms(req.GetWaitMs()))
	return resp, wire(ctx, "WaitProcess", err)
}

// DeleteProcess forgets an exited exec.
func (s *service) DeleteProcess(ctx context.Context, req *api.ProcessRequest) (*api.Empty, error) {
	return empty, wire(ctx, "DeleteProcess", s.a.DeleteProcess(ctx, req.GetId(), req.GetExecId()))
}

// DeleteContainer deletes a container; see Agent.Delete.
func (s *service) DeleteContainer(ctx context.Context, req *api.DeleteContainerRequest) (*api.Empty, error) {
	return empty, wire(ctx, "DeleteContainer", s.a.Delete(ctx, req.GetId(), req.GetForce()))
}

// State reports the runtime's view of a container.
func (s *service) State(ctx context.Context, req *api.ContainerRequest) (*api.StateResponse, error) {
	resp, err := s.a.State(ctx, req.GetId())
	return resp, wire(ctx, "State", err)
}

// ListPids lists the pids of a container.
func (s *service) ListPids(ctx context.Context, req *api.ContainerRequest) (*api.ListPidsResponse, error) {
	pids, err := s.a.Pids(ctx, req.GetId())
	if err != nil {
		return nil, wire(ctx, "ListPids", err)
	}
	return &api.ListPidsResponse{Pids: pids}, nil
}

// UpdateContainer changes a container's cgroup limits; see Agent.Update.
func (s *service) UpdateContainer(ctx context.Context, req *api.UpdateContainerRequest) (*api.Empty, error) {
	return empty, wire(ctx, "UpdateContainer", s.a.Update(ctx, req.GetId(), req.GetResources()))
}

// Pause freezes a container.
func (s *service) Pause(ctx context.Context, req *api.ContainerRequest) (*api.Empty, error) {
	return empty, wire(ctx, "Pause", s.a.Pause(ctx, req.GetId()))
}

// Resume thaws a container.
func (s *service) Resume(ctx context.Context, req *api.ContainerRequest) (*api.Empty, error) {
	return empty, wire(ctx, "Resume", s.a.Resume(ctx, req.GetId()))
}

// Stats returns a container's cgroup metrics.
func (s *service) Stats(ctx context.Context, req *api.ContainerRequest) (*api.StatsResponse, error) {
	data, err := s.a.Stats(ctx, req.GetId())
	if err != nil {
		return nil, wire(ctx, "Stats", err)
	}
	return &api.StatsResponse{Metrics: data}, nil
}

// ReadStdio returns output from an offset.
func (s *service) ReadStdio(ctx context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	resp, err := s.a.ReadStdio(ctx, req)
	return resp, wire(ctx, "ReadStdio", err)
}

// WriteStdin writes input at an offset.
func (s *service) WriteStdin(ctx context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	n, err := s.a.WriteStdin(ctx, req)
	if err != nil {
		return nil, wire(ctx, "WriteStdin", err)
	}
	return &api.WriteStdinResponse{Written: n}, nil
}

// CloseStdin closes a process's stdin.
func (s *service) CloseStdin(ctx context.Context, req *api.CloseStdinRequest) (*api.Empty, error) {
	return empty, wire(ctx, "CloseStdin", s.a.CloseStdin(ctx, req.GetId(), req.GetExecId()))
}

// ResizePty resizes a process's terminal.
func (s *service) ResizePty(ctx context.Context, req *api.ResizePtyRequest) (*api.Empty, error) {
	return empty, wire(ctx, "ResizePty", s.a.ResizePty(ctx, req))
}

// Events returns events after a sequence number.
func (s *service) Events(ctx context.Context, req *api.EventsRequest) (*api.EventsResponse, error) {
	resp, err := s.a.Events(ctx, req.GetAfter(), ms(req.GetWaitMs()))
	return resp, wire(ctx, "Events", err)
}

// Shutdown kills the containers and syncs; the guest reboots (and so the VM
// exits) once the reply is written.
func (s *service) Shutdown(ctx context.Context, _ *api.Empty) (*api.Empty, error) {
	s.a.Shutdown(ctx)
	return empty, nil
}
