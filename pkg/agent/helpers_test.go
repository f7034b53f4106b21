package agent

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/pkg/agent/api"
)

// testAgentVersion is what every fake agent answers to Ping.
const testAgentVersion = "fake-agent/1"

// streamSize is the size of the stdio streams moved by the relay tests.
const streamSize = 10 << 20

// testStream returns streamSize deterministic pseudo-random bytes and their
// sha256. The slice is shared: callers must not modify it.
var testStream = sync.OnceValues(func() ([]byte, [sha256.Size]byte) {
	b := make([]byte, streamSize)
	_, _ = rand.NewChaCha8([32]byte{'b', 'o', 'x', 'l', 'i', 't', 'e'}).Read(b)
	return b, sha256.Sum256(b)
})

// unimplementedAgent answers every method with errdefs.ErrNotImplemented.
type unimplementedAgent struct{}

var _ api.AgentService = unimplementedAgent{}

func (unimplementedAgent) Ping(context.Context, *api.PingRequest) (*api.PingResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) CreateContainer(context.Context, *api.CreateContainerRequest) (*api.CreateContainerResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) ConfigureNetwork(context.Context, *api.ConfigureNetworkRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) StartContainer(context.Context, *api.ContainerRequest) (*api.StartContainerResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) ExecProcess(context.Context, *api.ExecProcessRequest) (*api.ExecProcessResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) SignalProcess(context.Context, *api.SignalProcessRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) WaitProcess(context.Context, *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) DeleteProcess(context.Context, *api.ProcessRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) DeleteContainer(context.Context, *api.DeleteContainerRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) State(context.Context, *api.ContainerRequest) (*api.StateResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) ListPids(context.Context, *api.ContainerRequest) (*api.ListPidsResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) Pause(context.Context, *api.ContainerRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) Resume(context.Context, *api.ContainerRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) Stats(context.Context, *api.ContainerRequest) (*api.StatsResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) UpdateContainer(context.Context, *api.UpdateContainerRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) ReadStdio(context.Context, *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) WriteStdin(context.Context, *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) CloseStdin(context.Context, *api.CloseStdinRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) ResizePty(context.Context, *api.ResizePtyRequest) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) Events(context.Context, *api.EventsRequest) (*api.EventsResponse, error) {
	return nil, errdefs.ErrNotImplemented
}
func (unimplementedAgent) Shutdown(context.Context, *api.Empty) (*api.Empty, error) {
	return nil, errdefs.ErrNotImplemented
}

// fakeAgent answers Ping and serves the methods whose function field a test
// sets; the others fail with errdefs.ErrNotImplemented.
type fakeAgent struct {
	unimplementedAgent

	// state serves State.
	state func(context.Context, *api.ContainerRequest) (*api.StateResponse, error)
	// readStdio serves ReadStdio.
	readStdio func(context.Context, *api.ReadStdioRequest) (*api.ReadStdioResponse, error)
	// writeStdin serves WriteStdin.
	writeStdin func(context.Context, *api.WriteStdinRequest) (*api.WriteStdinResponse, error)
	// closeStdin serves CloseStdin.
	closeStdin func(context.Context, *api.CloseStdinRequest) (*api.Empty, error)
	// waitProcess serves WaitProcess.
	waitProcess func(context.Context, *api.WaitProcessRequest) (*api.WaitProcessResponse, error)
}

func (f *fakeAgent) Ping(context.Context, *api.PingRequest) (*api.PingResponse, error) {
	return &api.PingResponse{Version: testAgentVersion, Runtime: "crun", Kernel: "6.6.0-test"}, nil
}

func (f *fakeAgent) State(ctx context.Context, req *api.ContainerRequest) (*api.StateResponse, error) {
	if f.state == nil {
		return f.unimplementedAgent.State(ctx, req)
	}
	return f.state(ctx, req)
}

func (f *fakeAgent) ReadStdio(ctx context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	if f.readStdio == nil {
		return f.unimplementedAgent.ReadStdio(ctx, req)
	}
	return f.readStdio(ctx, req)
}

func (f *fakeAgent) WriteStdin(ctx context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	if f.writeStdin == nil {
		return f.unimplementedAgent.WriteStdin(ctx, req)
	}
	return f.writeStdin(ctx, req)
}

func (f *fakeAgent) CloseStdin(ctx context.Context, req *api.CloseStdinRequest) (*api.Empty, error) {
	if f.closeStdin == nil {
		return f.unimplementedAgent.CloseStdin(ctx, req)
	}
	return f.closeStdin(ctx, req)
}

func (f *fakeAgent) WaitProcess(ctx context.Context, req *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
	if f.waitProcess == nil {
		return f.unimplementedAgent.WaitProcess(ctx, req)
	}
	return f.waitProcess(ctx, req)
}

// listen listens on a fresh unix socket; the listener is closed at cleanup.
func listen(t testing.TB) (net.Listener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return ln, path
}

// serveAgent serves svc over ttrpc on ln until cleanup, which closes the
// server and waits for Serve to return.
func serveAgent(t testing.TB, ln net.Listener, svc api.AgentService) {
	t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatalf("new ttrpc server: %v", err)
	}
	api.RegisterAgentService(srv, svc)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ctx, ln)
	}()
	t.Cleanup(func() {
		cancel()
		_ = srv.Close()
		<-served
	})
}

// startAgent serves svc on a fresh unix socket and returns its path.
func startAgent(t testing.TB, svc api.AgentService) string {
	t.Helper()
	ln, path := listen(t)
	serveAgent(t, ln, svc)
	return path
}

// dial connects a Client to the agent at path; it is closed at cleanup.
func dial(t testing.TB, path string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := Dial(ctx, path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// startClient serves svc and returns a Client connected to it.
func startClient(t testing.TB, svc api.AgentService) *Client {
	t.Helper()
	return dial(t, startAgent(t, svc))
}

// hookListener runs hook on every accepted connection before its server sees
// it: a test can hold, read or rewrite what the client sent first.
type hookListener struct {
	net.Listener
	hook func(net.Conn) (net.Conn, error)
}

func (l *hookListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.hook(c)
}

// replayConn is a net.Conn whose reads come from r (bytes already taken
// from the connection, then the connection itself).
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// rawGuest listens on a fresh unix socket and runs guest on the first
// connection, without ttrpc: it plays a guest that speaks raw frames. At
// cleanup the listener and connection are closed and guest must return.
func rawGuest(t testing.TB, guest func(net.Conn)) string {
	t.Helper()
	ln, path := listen(t)
	var (
		mu   sync.Mutex
		conn net.Conn
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		mu.Lock()
		conn = c
		mu.Unlock()
		defer c.Close()
		guest(c)
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		if conn != nil {
			_ = conn.Close()
		}
		mu.Unlock()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("raw guest did not return after its connection was closed")
		}
	})
	return path
}

// header returns a ttrpc frame header.
func header(length, stream uint32, typ, flags byte) []byte {
	h := make([]byte, frameHeaderLen)
	binary.BigEndian.PutUint32(h[0:4], length)
	binary.BigEndian.PutUint32(h[4:8], stream)
	h[8], h[9] = typ, flags
	return h
}

// frame returns a whole ttrpc frame.
func frame(stream uint32, typ, flags byte, payload []byte) []byte {
	return append(header(uint32(len(payload)), stream, typ, flags), payload...)
}

// readFrame reads one ttrpc frame and returns its stream id and raw bytes.
func readFrame(r io.Reader) (uint32, []byte, error) {
	h := make([]byte, frameHeaderLen)
	if _, err := io.ReadFull(r, h); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[0:4])
	if n > 4<<20 {
		return 0, nil, fmt.Errorf("request frame of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, nil, err
	}
	return binary.BigEndian.Uint32(h[4:8]), append(h, p...), nil
}

// pingReply returns a valid ttrpc response frame answering Ping on stream.
// It may run on a fake guest's goroutine, so it reports with Errorf.
func pingReply(t testing.TB, stream uint32) []byte {
	payload, err := proto.Marshal(&api.PingResponse{Version: testAgentVersion})
	if err == nil {
		payload, err = proto.Marshal(&ttrpc.Response{Payload: payload})
	}
	if err != nil {
		t.Errorf("marshal ping response: %v", err)
		return nil
	}
	return frame(stream, frameTypeResp, 0, payload)
}

// waitClosed fails the test unless ch is closed within d.
func waitClosed(t testing.TB, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s: not closed within %v", what, d)
	}
}

// within runs f and fails the test if it does not return within d, so a
// regression that loops forever fails fast instead of hanging the suite.
func within(t testing.TB, d time.Duration, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("did not return within %v", d)
	}
}

// shortenPolls sets pollWait and pollMargin for one test. Tests using it
// must not run in parallel.
func shortenPolls(t testing.TB, wait, margin time.Duration) {
	t.Helper()
	oldWait, oldMargin := pollWait, pollMargin
	pollWait, pollMargin = wait, margin
	t.Cleanup(func() { pollWait, pollMargin = oldWait, oldMargin })
}

// checkLeaks fails the test if, once its other cleanups ran, more goroutines
// or file descriptors exist than when it started. Call it first so its
// cleanup runs last.
func checkLeaks(t testing.TB) {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
}

// requireProtocolError fails the test unless err wraps ErrProtocol.
func requireProtocolError(t testing.TB, err error) {
	t.Helper()
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("error %v does not wrap ErrProtocol", err)
	}
}

// hashWriter records the sha256 and size of what is written to it and
// stalls every stallEvery writes, like a consumer that drains a pipe slowly.
type hashWriter struct {
	// stallEvery is the period of stalls in writes; 0 never stalls.
	stallEvery int
	// stall is how long each stall lasts.
	stall time.Duration

	// h is the running sha256 of the bytes written.
	h hash.Hash
	// n counts the bytes written.
	n int64
	// writes counts the calls to Write.
	writes int
	// maxWrite is the largest single write seen.
	maxWrite int
	// empty counts writes of no bytes.
	empty int
}

func newHashWriter(stallEvery int, stall time.Duration) *hashWriter {
	return &hashWriter{stallEvery: stallEvery, stall: stall, h: sha256.New()}
}

func (w *hashWriter) Write(p []byte) (int, error) {
	w.writes++
	if w.stallEvery > 0 && w.writes%w.stallEvery == 0 {
		time.Sleep(w.stall)
	}
	w.h.Write(p)
	w.n += int64(len(p))
	w.maxWrite = max(w.maxWrite, len(p))
	if len(p) == 0 {
		w.empty++
	}
	return len(p), nil
}

// sum returns the sha256 of everything written.
func (w *hashWriter) sum() [sha256.Size]byte {
	var s [sha256.Size]byte
	copy(s[:], w.h.Sum(nil))
	return s
}
