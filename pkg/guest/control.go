package guest

import (
	"context"
	"encoding/json"
	"fmt"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// maxStatsSize bounds StatsResponse.metrics (agent.proto).
const maxStatsSize = 64 << 10

// maxResourcesSize bounds UpdateContainerRequest.resources (agent.proto).
const maxResourcesSize = 256 << 10

// Update applies new cgroup limits (an OCI LinuxResources in JSON) to a
// created, running or paused container with `runtime update`.
func (a *Agent) Update(ctx context.Context, id string, data []byte) error {
	if len(data) > maxResourcesSize {
		return fmt.Errorf("resources of %d bytes exceed %d: %w", len(data), maxResourcesSize, errdefs.ErrInvalidArgument)
	}
	var res specs.LinuxResources
	if err := json.Unmarshal(data, &res); err != nil {
		return fmt.Errorf("resources are not an OCI LinuxResources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	c, err := a.lockedContainer(ctx, id)
	if err != nil {
		return err
	}
	defer c.unlock()
	if err := c.require("update", statusCreated, statusRunning, statusPaused); err != nil {
		return err
	}
	return c.run(ctx, "update", func(ctx context.Context, r *runc.Runc) error {
		return r.Update(ctx, id, &res)
	})
}

// Signal sends sig to the init (execID empty) or an exec; with all, to every
// process of the container (init only). A process already reaped gives
// ErrNotFound.
func (a *Agent) Signal(ctx context.Context, req *api.SignalProcessRequest) error {
	sig := req.GetSignal()
	if sig > 64 {
		return fmt.Errorf("signal %d: %w", sig, errdefs.ErrInvalidArgument)
	}
	c, p, err := a.process(req.GetId(), req.GetExecId())
	if err != nil {
		return err
	}
	if !req.GetAll() {
		if err := p.handle.Signal(syscall.Signal(sig)); err != nil {
			return fmt.Errorf("signal %s: %w", p.name(), err)
		}
		return nil
	}
	if req.GetExecId() != "" {
		return fmt.Errorf("all applies to the init process only: %w", errdefs.ErrInvalidArgument)
	}
	return c.run(ctx, "kill", func(ctx context.Context, r *runc.Runc) error {
		return r.Kill(ctx, c.id, int(sig), &runc.KillOpts{All: true})
	})
}

// Wait returns the exit of the init (execID empty) or an exec, waiting up
// to wait for it.
func (a *Agent) Wait(ctx context.Context, id, execID string, wait time.Duration) (*api.WaitProcessResponse, error) {
	_, p, err := a.process(id, execID)
	if err != nil {
		return nil, err
	}
	ctx, cancel := a.pollContext(ctx)
	defer cancel()
	return p.wait(ctx, wait), nil
}

// State reports the container's status as the runtime sees it.
func (a *Agent) State(ctx context.Context, id string) (*api.StateResponse, error) {
	c, err := a.container(id)
	if err != nil {
		return nil, err
	}
	var st *runc.Container
	err = c.run(ctx, "state", func(ctx context.Context, r *runc.Runc) error {
		var err error
		st, err = r.State(ctx, id)
		return err
	})
	if err != nil {
		if isNotExist(err) {
			return nil, fmt.Errorf("%v: %w", err, errdefs.ErrNotFound)
		}
		return nil, err
	}
	return &api.StateResponse{Id: id, Status: st.Status, Pid: uint32(st.Pid)}, nil
}

// Pids lists the guest pids in the container's cgroup.
func (a *Agent) Pids(ctx context.Context, id string) ([]uint32, error) {
	m, err := a.cgroup(id)
	if err != nil {
		return nil, err
	}
	procs, err := m.Procs(true)
	if err != nil {
		return nil, fmt.Errorf("list pids of %s: %w", id, err)
	}
	out := make([]uint32, len(procs))
	for i, p := range procs {
		out[i] = uint32(p)
	}
	return out, nil
}

// Stats returns the container's cgroup v2 metrics, marshalled.
func (a *Agent) Stats(ctx context.Context, id string) ([]byte, error) {
	m, err := a.cgroup(id)
	if err != nil {
		return nil, err
	}
	metrics, err := m.Stat()
	if err != nil {
		return nil, fmt.Errorf("stats of %s: %w", id, err)
	}
	data, err := proto.Marshal(metrics)
	if err != nil {
		return nil, fmt.Errorf("marshal stats of %s: %w", id, err)
	}
	if len(data) > maxStatsSize {
		return nil, fmt.Errorf("stats of %s are %d bytes, over %d: %w", id, len(data), maxStatsSize, errdefs.ErrResourceExhausted)
	}
	return data, nil
}

// cgroup returns the cgroup manager of container id.
func (a *Agent) cgroup(id string) (*cgroup2.Manager, error) {
	c, err := a.container(id)
	if err != nil {
		return nil, err
	}
	m, err := cgroup2.Load(c.cgroup, cgroup2.WithMountpoint(a.cfg.cgroupRoot))
	if err != nil {
		return nil, fmt.Errorf("cgroup of %s: %w", id, err)
	}
	return m, nil
}

// Pause freezes a running container.
func (a *Agent) Pause(ctx context.Context, id string) error {
	return a.freeze(ctx, id, "pause", statusRunning, statusPaused)
}

// Resume thaws a paused container.
func (a *Agent) Resume(ctx context.Context, id string) error {
	return a.freeze(ctx, id, "resume", statusPaused, statusRunning)
}

// freeze runs `runtime pause` or `runtime resume`.
func (a *Agent) freeze(ctx context.Context, id, op string, from, to status) error {
	c, err := a.lockedContainer(ctx, id)
	if err != nil {
		return err
	}
	defer c.unlock()
	if err := c.require(op, from); err != nil {
		return err
	}
	if err := c.run(ctx, op, func(ctx context.Context, r *runc.Runc) error {
		if op == "pause" {
			return r.Pause(ctx, id)
		}
		return r.Resume(ctx, id)
	}); err != nil {
		return err
	}
	c.setStatus(to)
	return nil
}

// ReadStdio returns a process's stdout or stderr from offset; see
// outStream.Read.
func (a *Agent) ReadStdio(ctx context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	_, p, err := a.process(req.GetId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	s, err := p.stream(req.GetStream())
	if err != nil {
		return nil, err
	}
	ctx, cancel := a.pollContext(ctx)
	defer cancel()
	wait := time.Duration(req.GetWaitMs()) * time.Millisecond
	data, eof, err := s.Read(ctx, req.GetOffset(), int(req.GetMax()), wait)
	if err != nil {
		return nil, err
	}
	return &api.ReadStdioResponse{Data: data, Eof: eof}, nil
}

// WriteStdin writes to a process's stdin at offset; see inStream.Write.
func (a *Agent) WriteStdin(ctx context.Context, req *api.WriteStdinRequest) (uint64, error) {
	_, p, err := a.process(req.GetId(), req.GetExecId())
	if err != nil {
		return 0, err
	}
	in, err := p.stdinStream()
	if err != nil {
		return 0, err
	}
	return in.Write(ctx, req.GetOffset(), req.GetData())
}

// CloseStdin closes a process's stdin after the writes in progress.
func (a *Agent) CloseStdin(ctx context.Context, id, execID string) error {
	_, p, err := a.process(id, execID)
	if err != nil {
		return err
	}
	in, err := p.stdinStream()
	if err != nil {
		return err
	}
	return in.Close(ctx)
}
