package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/boxlite/boxlite/pkg/logfile"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// The test binary doubles as a fake containerd-shim-boxlite-v1: run with
// fakeShimEnv set, it implements the start and delete actions and, as the
// spawned long-lived shim, a Task v3 service whose "processes" follow a tiny
// language (see fakeProc). The manager drives it over a real ttrpc socket.
const fakeShimEnv = "BOXLITE_FAKE_SHIM"

// Knobs the tests set (the fake inherits the test's environment).
const (
	// fakeStartOutput picks the start action's answer: proto (default),
	// json, plain, garbage, or fail.
	fakeStartOutput = "BOXLITE_FAKE_START_OUTPUT"
	// fakeCreateFail makes Create fail.
	fakeCreateFail = "BOXLITE_FAKE_CREATE_FAIL"
)

func TestMain(m *testing.M) {
	switch os.Getenv(fakeShimEnv) {
	case "serve":
		fakeShimServe()
		return
	case "":
	default:
		os.Exit(fakeShimAction())
	}
	reaper.Default()
	os.Setenv(fakeShimEnv, "action")
	// A -race binary sleeps a second at exit by default; the fake shims
	// are this binary.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	os.Exit(m.Run())
}

// fakeShimAction is the shim binary's start or delete action.
func fakeShimAction() int {
	fs := flag.NewFlagSet("fake-shim", flag.ContinueOnError)
	ns := fs.String("namespace", "", "")
	address := fs.String("address", "", "")
	publish := fs.String("publish-binary", "", "")
	id := fs.String("id", "", "")
	bundle := fs.String("bundle", "", "")
	fs.Bool("debug", false, "")
	if err := fs.Parse(os.Args[1:]); err != nil || fs.NArg() != 1 {
		fmt.Fprintf(os.Stderr, "fake shim: bad command line %q", os.Args[1:])
		return 1
	}
	cwd, _ := os.Getwd()
	switch fs.Arg(0) {
	case "start":
		return fakeStart(*ns, *address, *publish, *id, cwd)
	case "delete":
		if *bundle != cwd {
			fmt.Fprintf(os.Stderr, "fake shim: delete: -bundle %s but cwd %s", *bundle, cwd)
			return 1
		}
		os.WriteFile(filepath.Join(*bundle, "delete-action-ran"), nil, 0o644)
		data, _ := proto.Marshal(&taskapi.DeleteResponse{ExitStatus: 137, ExitedAt: timestamppb.Now()})
		os.Stdout.Write(data)
		return 0
	}
	fmt.Fprintf(os.Stderr, "fake shim: unknown action %q", fs.Arg(0))
	return 1
}

// fakeStart checks that it was started the way containerd 2.4 starts a
// shim, records what it got, spawns the long-lived fake and prints its
// address in the requested format.
func fakeStart(ns, address, publish, id, cwd string) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "fake shim: "+format, args...)
		return 1
	}
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		return fail("read stdin: %v", err)
	}
	var p bootapi.BootstrapParams
	if err := proto.Unmarshal(in, &p); err != nil {
		return fail("stdin is not BootstrapParams: %v", err)
	}
	switch {
	case p.GetInstanceID() != id || p.GetNamespace() != ns || ns != Namespace:
		return fail("params id/ns %q/%q, flags %q/%q", p.GetInstanceID(), p.GetNamespace(), id, ns)
	case p.GetContainerdTtrpcAddress() != os.Getenv("TTRPC_ADDRESS") || p.GetContainerdTtrpcAddress() == "":
		return fail("ttrpc address %q, TTRPC_ADDRESS %q", p.GetContainerdTtrpcAddress(), os.Getenv("TTRPC_ADDRESS"))
	case p.GetContainerdGrpcAddress() != address || os.Getenv("GRPC_ADDRESS") != address:
		return fail("grpc address %q, -address %q, GRPC_ADDRESS %q", p.GetContainerdGrpcAddress(), address, os.Getenv("GRPC_ADDRESS"))
	case os.Getenv("NAMESPACE") != ns || p.GetContainerdBinary() != publish || p.GetSocketDir() == "":
		return fail("NAMESPACE %q, binary %q/%q, socket dir %q", os.Getenv("NAMESPACE"), p.GetContainerdBinary(), publish, p.GetSocketDir())
	}
	if _, err := os.Stat(filepath.Join(cwd, "config.json")); err != nil {
		return fail("cwd %s is not the bundle: %v", cwd, err)
	}
	rec, _ := json.Marshal(map[string]string{"id": id, "ns": ns, "address": address, "publish": publish,
		"ttrpc": p.GetContainerdTtrpcAddress(), "socket_dir": p.GetSocketDir(), "cwd": cwd})
	os.WriteFile(filepath.Join(cwd, "bootstrap-received.json"), rec, 0o644)

	mode := os.Getenv(fakeStartOutput)
	if mode == "fail" {
		return fail("refusing to start (test)")
	}
	sum := sha256.Sum256([]byte(address + "/" + ns + "/" + id))
	sock := filepath.Join(p.GetSocketDir(), hex.EncodeToString(sum[:8]))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return fail("listen: %v", err)
	}
	f, err := l.File()
	l.SetUnlinkOnClose(false)
	l.Close()
	if err != nil {
		return fail("listener file: %v", err)
	}
	self, _ := os.Executable()
	// The real shim's command line (the manager finds a stray shim by it).
	cmd := exec.Command(self, "-namespace", ns, "-id", id, "-address", address)
	cmd.Dir = cwd
	cmd.Env = append(os.Environ(), fakeShimEnv+"=serve", "FAKE_SHIM_SOCKET="+sock)
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if _, err := reaper.Default().Start(cmd); err != nil {
		return fail("spawn: %v", err)
	}
	addr := "unix://" + sock
	switch mode {
	case "json":
		fmt.Printf(`{"version":3,"address":%q,"protocol":"ttrpc"}`, addr)
	case "plain":
		fmt.Println(addr)
	case "garbage":
		fmt.Print("this is not an address")
	default:
		data, _ := proto.Marshal(&bootapi.BootstrapResult{Version: 3, Address: addr, Protocol: "ttrpc"})
		os.Stdout.Write(data)
	}
	return 0
}

// fakeShimServe is the long-lived fake shim: a Task v3 service on fd 3.
func fakeShimServe() {
	l, err := net.FileListener(os.NewFile(3, "socket"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake shim serve:", err)
		os.Exit(1)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		os.Exit(1)
	}
	s := &fakeTask{procs: map[string]*fakeProc{}, exit: make(chan struct{})}
	taskapi.RegisterTTRPCTaskService(srv, s)
	go srv.Serve(context.Background(), l)
	<-s.exit
	// Like the shim library: the Shutdown reply may or may not get out.
	srv.Close()
	os.Remove(os.Getenv("FAKE_SHIM_SOCKET"))
	os.Exit(0)
}

// fakeProc is a fake process. Its args are a tiny language: "exit N"
// prints "bye" on stdout and "oops" on stderr and exits N; "sleep" runs
// until signalled (exit 128+signal); "trap" prints "ready" on stdout, then
// "trapped" on stderr once signalled, and exits 128+signal; "stubborn"
// ignores every signal but SIGKILL; "cat" copies stdin to stdout until EOF;
// "env" prints its environment. Output goes where the shim would send it:
// FIFOs, a raw file:// log, or a framed one (file://PATH?format=framed).
type fakeProc struct {
	args                  []string
	env                   []string
	stdin, stdout, stderr string
	status                tasktypes.Status
	exitStatus            uint32
	exitedAt              *timestamppb.Timestamp
	exited                chan struct{}
	killed                chan syscall.Signal
	outputs               []io.Closer
}

// fakeTask is the fake shim's Task v3 service.
type fakeTask struct {
	mu       sync.Mutex
	id       string
	procs    map[string]*fakeProc
	exit     chan struct{}
	exitOnce sync.Once
}

var _ taskapi.TTRPCTaskService = (*fakeTask)(nil)

func (s *fakeTask) proc(id, execID string) (*fakeProc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.procs[execID]
	if id != s.id || !ok {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s/%s: %w", id, execID, errdefs.ErrNotFound))
	}
	return p, nil
}

func (s *fakeTask) Create(ctx context.Context, r *taskapi.CreateTaskRequest) (*taskapi.CreateTaskResponse, error) {
	if os.Getenv(fakeCreateFail) != "" {
		return nil, errgrpc.ToGRPC(fmt.Errorf("guest refused the box (test): %w", errdefs.ErrFailedPrecondition))
	}
	data, err := os.ReadFile(filepath.Join(r.Bundle, "config.json"))
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.id = r.ID
	s.procs[""] = newFakeProc(spec.Process.Args, spec.Process.Env, r.Stdin, r.Stdout, r.Stderr)
	return &taskapi.CreateTaskResponse{Pid: uint32(os.Getpid())}, nil
}

func newFakeProc(args, env []string, stdin, stdout, stderr string) *fakeProc {
	return &fakeProc{args: args, env: env, stdin: stdin, stdout: stdout, stderr: stderr,
		status: tasktypes.Status_CREATED, exited: make(chan struct{}), killed: make(chan syscall.Signal, 8)}
}

func (s *fakeTask) Start(ctx context.Context, r *taskapi.StartRequest) (*taskapi.StartResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	p.status = tasktypes.Status_RUNNING
	s.mu.Unlock()
	go s.run(r.ID, r.ExecID, p)
	return &taskapi.StartResponse{Pid: uint32(os.Getpid())}, nil
}

// run plays the fake process and records its exit.
func (s *fakeTask) run(id, execID string, p *fakeProc) {
	out, errw, closers := openFakeOutputs(p.stdout, p.stderr)
	write := func(w io.Writer, s string) {
		if w != nil {
			io.WriteString(w, s)
		}
	}
	var status uint32
	switch p.args[0] {
	case "exit":
		n, _ := strconv.Atoi(p.args[1])
		write(out, "bye\n")
		write(errw, "oops\n")
		status = uint32(n)
	case "sleep":
		status = 128 + uint32(<-p.killed)
	case "trap":
		write(out, "ready\n")
		status = 128 + uint32(<-p.killed)
		write(errw, "trapped\n")
	case "stubborn":
		for sig := range p.killed {
			if sig == syscall.SIGKILL {
				status = 128 + uint32(sig)
				break
			}
		}
	case "cat":
		if in, err := os.OpenFile(p.stdin, os.O_RDONLY, 0); err == nil {
			if out != nil {
				io.Copy(out, in)
			}
			in.Close()
		}
	case "env":
		for _, e := range p.env {
			write(out, e+"\n")
		}
	}
	s.mu.Lock()
	p.status, p.exitStatus, p.exitedAt = tasktypes.Status_STOPPED, status, timestamppb.Now()
	exitedAt := p.exitedAt
	p.outputs = closers
	s.mu.Unlock()
	close(p.exited)
	publishExit(id, execID, status, exitedAt)
}

// openFakeOutputs opens a process's stdout and stderr as the shim does: a
// file:// URI is opened once for both streams, framed (pkg/logfile) with
// format=framed; anything else is a FIFO path. It returns what to close
// when the process is deleted.
func openFakeOutputs(stdout, stderr string) (out, errw io.Writer, closers []io.Closer) {
	if u, err := url.Parse(stdout); err == nil && u.Scheme == "file" {
		f, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, nil, nil
		}
		out, errw = f, f
		if u.Query().Get("format") == "framed" {
			out, errw = logfile.NewWriters(f)
		}
		if stderr == "" {
			errw = nil
		}
		return out, errw, []io.Closer{f}
	}
	open := func(path string) io.Writer {
		if path == "" {
			return nil
		}
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil
		}
		closers = append(closers, f)
		return f
	}
	return open(stdout), open(stderr), closers
}

// publishExit forwards a TaskExit to TTRPC_ADDRESS, best effort.
func publishExit(id, execID string, status uint32, exitedAt *timestamppb.Timestamp) {
	conn, err := net.Dial("unix", os.Getenv("TTRPC_ADDRESS"))
	if err != nil {
		return
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	pid := id
	if execID != "" {
		pid = execID
	}
	ev, _ := anypb.New(&eventtypes.TaskExit{ContainerID: id, ID: pid, ExitStatus: status, ExitedAt: exitedAt})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	eventsapi.NewTTRPCEventsClient(c).Forward(ctx, &eventsapi.ForwardRequest{Envelope: &types.Envelope{
		Timestamp: timestamppb.Now(), Namespace: Namespace, Topic: "/tasks/exit", Event: ev,
	}})
}

func (s *fakeTask) Wait(ctx context.Context, r *taskapi.WaitRequest) (*taskapi.WaitResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, errgrpc.ToGRPC(ctx.Err())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &taskapi.WaitResponse{ExitStatus: p.exitStatus, ExitedAt: p.exitedAt}, nil
}

func (s *fakeTask) Kill(ctx context.Context, r *taskapi.KillRequest) (*emptypb.Empty, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	running := p.status == tasktypes.Status_RUNNING
	s.mu.Unlock()
	if !running {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process not running: %w", errdefs.ErrNotFound))
	}
	select {
	case p.killed <- syscall.Signal(r.Signal):
	default:
	}
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Delete(ctx context.Context, r *taskapi.DeleteRequest) (*taskapi.DeleteResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.status == tasktypes.Status_RUNNING {
		return nil, errgrpc.ToGRPC(fmt.Errorf("cannot delete a running process: %w", errdefs.ErrFailedPrecondition))
	}
	for _, c := range p.outputs {
		c.Close()
	}
	at := p.exitedAt
	if at == nil {
		at = timestamppb.Now() // never started
	}
	delete(s.procs, r.ExecID)
	return &taskapi.DeleteResponse{ExitStatus: p.exitStatus, ExitedAt: at}, nil
}

func (s *fakeTask) State(ctx context.Context, r *taskapi.StateRequest) (*taskapi.StateResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &taskapi.StateResponse{ID: r.ID, ExecID: r.ExecID, Pid: uint32(os.Getpid()), Status: p.status, ExitStatus: p.exitStatus, ExitedAt: p.exitedAt}, nil
}

func (s *fakeTask) Exec(ctx context.Context, r *taskapi.ExecProcessRequest) (*emptypb.Empty, error) {
	if _, err := s.proc(r.ID, ""); err != nil {
		return nil, err
	}
	if r.GetSpec().GetTypeUrl() != processSpecURL {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec spec type %q: %w", r.GetSpec().GetTypeUrl(), errdefs.ErrInvalidArgument))
	}
	var proc specs.Process
	if err := json.Unmarshal(r.GetSpec().GetValue(), &proc); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.procs[r.ExecID] = newFakeProc(proc.Args, proc.Env, r.Stdin, r.Stdout, r.Stderr)
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Connect(ctx context.Context, r *taskapi.ConnectRequest) (*taskapi.ConnectResponse, error) {
	return &taskapi.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: uint32(os.Getpid())}, nil
}

func (s *fakeTask) Shutdown(ctx context.Context, r *taskapi.ShutdownRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	busy := len(s.procs) > 0
	s.mu.Unlock()
	if busy && !r.Now {
		return &emptypb.Empty{}, nil
	}
	s.exitOnce.Do(func() { close(s.exit) })
	return &emptypb.Empty{}, nil
}

func (s *fakeTask) Pids(context.Context, *taskapi.PidsRequest) (*taskapi.PidsResponse, error) {
	return &taskapi.PidsResponse{}, nil
}
func (s *fakeTask) Pause(context.Context, *taskapi.PauseRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}
func (s *fakeTask) Resume(context.Context, *taskapi.ResumeRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}
func (s *fakeTask) Checkpoint(context.Context, *taskapi.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}
func (s *fakeTask) ResizePty(context.Context, *taskapi.ResizePtyRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *fakeTask) CloseIO(context.Context, *taskapi.CloseIORequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
func (s *fakeTask) Update(context.Context, *taskapi.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}
func (s *fakeTask) Stats(context.Context, *taskapi.StatsRequest) (*taskapi.StatsResponse, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented)
}
