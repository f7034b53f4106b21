package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// ShimBinaryName is the shim the manager bootstraps, the binary containerd
// runs for the runtime io.containerd.boxlite.v1.
const ShimBinaryName = "containerd-shim-boxlite-v1"

// Namespace is the containerd namespace the manager's boxes live in.
const Namespace = "boxlite"

// maxShimOutput bounds what the manager reads from a shim's start or delete
// action; a shim printing more is broken.
const maxShimOutput = 64 << 10

// Bounds of the shim's actions. start boots nothing (the long-lived shim
// boots the VM in Create), so it is quick; delete may kill and wait for a VMM.
const (
	shimStartTimeout  = 30 * time.Second
	shimDeleteTimeout = 60 * time.Second
)

// FindShim returns the shim binary: next to the executable self, else in
// PATH.
func FindShim(self string) (string, error) {
	if self != "" {
		p := filepath.Join(filepath.Dir(self), ShimBinaryName)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	p, err := exec.LookPath(ShimBinaryName)
	if err != nil {
		return "", errorf(errdefs.ErrNotFound, "%s not found next to %s or in PATH: run make build", ShimBinaryName, self)
	}
	return filepath.Abs(p)
}

// BootstrapResult is what a shim's start action printed: where it listens.
type BootstrapResult struct {
	// Address is the shim's task API address (unix://path or a path).
	Address string
	// Protocol is "ttrpc" (the only one the manager speaks) or "grpc".
	Protocol string
	// Version is the shim protocol version (2 or 3).
	Version int32
}

// ParseBootstrapResult accepts the three answers containerd 2.4 accepts
// from a shim's start action: a bootstrap.v1.BootstrapResult protobuf, JSON
// {"version":3,"address":...,"protocol":"ttrpc"}, or a plain address.
func ParseBootstrapResult(out []byte) (BootstrapResult, error) {
	if len(out) > maxShimOutput {
		return BootstrapResult{}, errorf(errdefs.ErrInvalidArgument, "shim start printed %d bytes (more than %d)", len(out), maxShimOutput)
	}
	// Arbitrary text can decode as a protobuf of unknown fields, so the
	// protobuf is accepted only when it names an address.
	var pb bootapi.BootstrapResult
	if err := proto.Unmarshal(out, &pb); err == nil && validAddress(pb.GetAddress()) {
		return finishResult(BootstrapResult{Address: pb.GetAddress(), Protocol: pb.GetProtocol(), Version: pb.GetVersion()})
	}
	text := bytes.TrimSpace(out)
	var js struct {
		Version  int32  `json:"version"`
		Address  string `json:"address"`
		Protocol string `json:"protocol"`
	}
	if err := json.Unmarshal(text, &js); err == nil && js.Version >= 2 {
		return finishResult(BootstrapResult{Address: js.Address, Protocol: js.Protocol, Version: js.Version})
	}
	return finishResult(BootstrapResult{Address: string(text), Protocol: "ttrpc", Version: 2})
}

func finishResult(r BootstrapResult) (BootstrapResult, error) {
	if r.Protocol == "" {
		r.Protocol = "ttrpc"
	}
	if !validAddress(r.Address) {
		return BootstrapResult{}, errorf(errdefs.ErrInvalidArgument, "shim start printed no usable address (%q)", clip(r.Address))
	}
	if r.Protocol != "ttrpc" {
		return BootstrapResult{}, errorf(errdefs.ErrNotImplemented, "shim speaks %q: the manager speaks ttrpc only", r.Protocol)
	}
	if r.Version > 3 {
		return BootstrapResult{}, errorf(errdefs.ErrNotImplemented, "unsupported shim version (%d)", r.Version)
	}
	return r, nil
}

// validAddress accepts unix://path, a plain absolute path, or an abstract
// socket (@name or unix://@name).
func validAddress(a string) bool {
	p := strings.TrimPrefix(a, "unix://")
	if p == "" || len(p) > 108 {
		return false
	}
	if !strings.HasPrefix(p, "/") && !strings.HasPrefix(p, "@") && !strings.HasPrefix(p, "\x00") {
		return false
	}
	for _, c := range p[1:] {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// shimCommand describes one invocation of the shim binary's actions.
type shimCommand struct {
	// binary is the shim executable.
	binary string
	// self is the manager's executable (-publish-binary, containerd_binary).
	self string
	// ttrpcAddress is the manager's events socket (TTRPC_ADDRESS).
	ttrpcAddress string
	// grpcAddress is GRPC_ADDRESS and -address (need not exist).
	grpcAddress string
	// socketDir is BootstrapParams.socket_dir.
	socketDir string
}

// args returns the command line containerd 2.4 uses for action.
func (c shimCommand) args(id, bundle, action string) []string {
	a := []string{"-namespace", Namespace, "-address", c.grpcAddress, "-publish-binary", c.self, "-id", id}
	if bundle != "" {
		a = append(a, "-bundle", bundle)
	}
	return append(a, action)
}

func (c shimCommand) cmd(dir string, args []string) *exec.Cmd {
	cmd := exec.Command(c.binary, args...)
	cmd.Dir = dir
	cmd.Env = append(reaper.Environ(),
		"GOMAXPROCS=2",
		"MAX_SHIM_VERSION=2",
		"TTRPC_ADDRESS="+c.ttrpcAddress,
		"GRPC_ADDRESS="+c.grpcAddress,
		"NAMESPACE="+Namespace,
	)
	// Its own process group: a ^C at the terminal is for the manager,
	// which forwards it to the task.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// params returns the BootstrapParams containerd 2.4 writes to a shim's
// start action.
func (c shimCommand) params(id string) *bootapi.BootstrapParams {
	dir := c.socketDir
	return &bootapi.BootstrapParams{
		InstanceID:             id,
		Namespace:              Namespace,
		LogLevel:               bootapi.LogLevel_LOG_LEVEL_INFO,
		ContainerdTtrpcAddress: c.ttrpcAddress,
		ContainerdGrpcAddress:  c.grpcAddress,
		ContainerdBinary:       c.self,
		SocketDir:              &dir,
	}
}

// start runs `<shim> ... -id ID start` in bundle and returns where the
// long-lived shim it spawned listens. The start process exits quickly; the
// shim it spawns daemonizes and reparents to the manager (a subreaper).
func (c shimCommand) start(ctx context.Context, id, bundle string) (BootstrapResult, error) {
	in, err := proto.Marshal(c.params(id))
	if err != nil {
		return BootstrapResult{}, err
	}
	cmd := c.cmd(bundle, c.args(id, "", "start"))
	cmd.Stdin = bytes.NewReader(in)
	out, err := runBounded(ctx, cmd, shimStartTimeout)
	if err != nil {
		return BootstrapResult{}, fmt.Errorf("start shim: %w", err)
	}
	return ParseBootstrapResult(out)
}

// delete runs the shim's delete action for a box whose shim is gone: it
// finds and kills the VMM by its pid file and cleans up, and prints a task
// DeleteResponse.
func (c shimCommand) delete(ctx context.Context, id, bundle string) (*taskapi.DeleteResponse, error) {
	cmd := c.cmd(bundle, c.args(id, bundle, "delete"))
	out, err := runBounded(ctx, cmd, shimDeleteTimeout)
	if err != nil {
		return nil, fmt.Errorf("shim delete action: %w", err)
	}
	var resp taskapi.DeleteResponse
	if err := proto.Unmarshal(out, &resp); err != nil {
		return nil, fmt.Errorf("shim delete action printed no DeleteResponse (%q): %w", clip(string(out)), err)
	}
	return &resp, nil
}

// runBounded runs cmd through the reaper and returns its stdout, read up to
// maxShimOutput+1 bytes. A failure quotes the last line of its stderr. The
// process is killed at the timeout or when ctx ends.
func runBounded(ctx context.Context, cmd *exec.Cmd, timeout time.Duration) ([]byte, error) {
	stdout := &boundedBuffer{max: maxShimOutput + 1}
	stderr := &boundedBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		// Kill it and collect it: no zombie, whatever ctx says.
		p.Signal(syscall.SIGKILL)
		wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer wcancel()
		p.Wait(wctx)
		return nil, fmt.Errorf("%s did not finish: %w", filepath.Base(cmd.Path), err)
	}
	if e.Status != 0 {
		msg := lastLine(stderr.Bytes())
		if msg == "" {
			return nil, fmt.Errorf("%s: exit status %d", filepath.Base(cmd.Path), e.Status)
		}
		return nil, fmt.Errorf("%s (exit status %d)", msg, e.Status)
	}
	return stdout.Bytes(), nil
}

// lastLine returns the last non-empty line of b.
func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// boundedBuffer keeps the first max bytes written to it and discards the
// rest (so the writer never blocks on a full pipe), remembering how much
// was written.
type boundedBuffer struct {
	buf   bytes.Buffer
	max   int
	total int
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.total += len(p)
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

// Bytes returns what was kept; when more than max was written, a result of
// length max tells the caller the output was oversized.
func (b *boundedBuffer) Bytes() []byte { return b.buf.Bytes() }

// errShimGone marks operations on a box whose shim is not running.
var errShimGone = errors.New("shim is not running")
