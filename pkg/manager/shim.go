package manager

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/ttrpc"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// dialTimeout bounds connecting to a shim's socket.
const dialTimeout = 5 * time.Second

// shimConn is a ttrpc connection to one box's shim.
type shimConn struct {
	// client is the ttrpc connection; task is the Task v3 API over it.
	client *ttrpc.Client
	task   taskapi.TTRPCTaskService
}

// dialShim connects to a shim's task API at address (unix://path, a path,
// or an abstract @name).
func dialShim(ctx context.Context, address string) (*shimConn, error) {
	path := strings.TrimPrefix(address, "unix://")
	if strings.HasPrefix(path, "\x00") {
		path = "@" + path[1:]
	}
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to shim at %s: %w", address, err)
	}
	c := ttrpc.NewClient(conn)
	return &shimConn{client: c, task: taskapi.NewTTRPCTaskClient(c)}, nil
}

// Close closes the connection; the shim keeps running.
func (s *shimConn) Close() error {
	if s == nil {
		return nil
	}
	return s.client.Close()
}

// shimPid learns the shim's pid: from Connect, else from the shim.pid file
// in the bundle (which containerd's shims write).
func shimPid(ctx context.Context, s *shimConn, id, bundle string) (reaper.Identity, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := s.task.Connect(cctx, &taskapi.ConnectRequest{ID: id})
	pid := int(resp.GetShimPid())
	if pid <= 0 {
		pid = pidFileFromBundle(bundle)
	}
	if pid <= 0 {
		if err != nil {
			return reaper.Identity{}, fmt.Errorf("shim connect: %w", err)
		}
		return reaper.Identity{}, fmt.Errorf("shim did not say its pid")
	}
	return reaper.ReadIdentity(pid)
}

// pidFileFromBundle reads the shim.pid a containerd shim writes in its
// bundle, or 0.
func pidFileFromBundle(bundle string) int {
	data, err := os.ReadFile(filepath.Join(bundle, "shim.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid
}

// removeDeadSockets removes sockets in dir that nobody listens on (a dial
// is refused): what a killed shim leaves.
func removeDeadSockets(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Type()&os.ModeSocket == 0 {
			continue
		}
		p := filepath.Join(dir, e.Name())
		conn, err := net.DialTimeout("unix", p, time.Second)
		if err == nil {
			conn.Close()
			continue
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			os.Remove(p)
		}
	}
}
