package shim

import (
	"context"
	"fmt"

	cg2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// Stats returns a container's guest cgroup v2 figures as containerd's cgroup v2
// metrics type (what `ctr task metrics` decodes).
func (s *service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	sb, c, err := s.runningIn(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := sb.vm.Agent().Stats(ctx, &api.ContainerRequest{Id: c.id})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	var m cg2stats.Metrics
	if err := proto.Unmarshal(resp.Metrics, &m); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("guest sent undecodable metrics: %v: %w", err, errdefs.ErrDataLoss))
	}
	any, err := typeurl.MarshalAnyToProto(&m)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: any}, nil
}
