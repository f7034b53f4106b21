package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// The fuzz targets of the host side of the agent protocol: what a hostile
// guest controls is fed to the real Client, and each target checks the
// result against a model of what the client promises. This file has the
// scripted guest they share and the target for every unary reply;
// fuzz_guard_test.go fuzzes the frame guard, fuzz_stdio_test.go the
// polling helpers (CopyOutput, CopyInput, Wait).

// fuzzCallTimeout bounds every call of a fuzz target. No call may reach it:
// a reply, good or bad, is answered at once, so a call that times out is a
// hang.
const fuzzCallTimeout = 5 * time.Second

// agentService is the ttrpc service name of the agent API.
const agentService = "boxlite.agent.v1.Agent"

// maxFuzzInput bounds the inputs the fuzz targets try. A larger one tests
// nothing a smaller one does not, and the fuzzer's minimization of every
// new input it keeps takes time that grows with its size (it stalled the
// targets for seconds at a time).
const maxFuzzInput = 1 << 10

// guestAnswer answers one call of method, whose request is req (raw
// protobuf), with a raw reply payload or an error (sent as a ttrpc status).
type guestAnswer func(method string, req []byte) ([]byte, error)

// rawReply is a message that marshals to exactly payload: the scripted
// guest's way to send bytes that need not decode.
func rawReply(payload []byte) proto.Message {
	m := &api.Empty{}
	m.ProtoReflect().SetUnknown(payload)
	return m
}

// pipeListener accepts one connection, then blocks until closed.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener(c net.Conn) *pipeListener {
	l := &pipeListener{conns: make(chan net.Conn, 1), closed: make(chan struct{})}
	l.conns <- c
	return l
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// scriptedClient serves methods with answer (a real ttrpc server, over
// net.Pipe) and returns a Client connected to it with newClient, as Dial
// does, without the ready pings. Everything is closed at cleanup.
func scriptedClient(t testing.TB, answer guestAnswer, methods ...string) *Client {
	t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatalf("new ttrpc server: %v", err)
	}
	desc := &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{}}
	for _, m := range methods {
		desc.Methods[m] = func(_ context.Context, unmarshal func(any) error) (any, error) {
			var req api.Empty // the request's fields stay raw, as unknown fields
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			payload, err := answer(m, req.ProtoReflect().GetUnknown())
			if err != nil {
				return nil, err
			}
			return rawReply(payload), nil
		}
	}
	srv.RegisterService(agentService, desc)
	host, guest := net.Pipe()
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(context.Background(), newPipeListener(guest))
	}()
	c := newClient(host)
	t.Cleanup(func() {
		_ = c.Close()
		_ = srv.Close()
		<-served
	})
	return c
}

// fuzzCtx returns a context bounding one fuzz call.
func fuzzCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), fuzzCallTimeout)
	t.Cleanup(cancel)
	return ctx
}

// requireNoHang fails the test if a call ended by the fuzz deadline.
func requireNoHang(t testing.TB, ctx context.Context, err error) {
	t.Helper()
	if ctx.Err() != nil {
		t.Fatalf("call hung until the %v deadline: %v", fuzzCallTimeout, err)
	}
}

// guestStatus returns the error the scripted guest answers for the fuzz
// byte code (nil for 0): a status with one of the 16 non-OK gRPC codes.
func guestStatus(code uint8, msg string) error {
	if code == 0 {
		return nil
	}
	return status.Error(codes.Code(1+int(code-1)%16), strings.ToValidUTF8(msg, "?"))
}

// requireStatusClass fails the test unless err is the guest's failure
// status want, with its class intact for the shim (errgrpc.ToGRPC gives
// back the code) and not taken for a protocol violation.
func requireStatusClass(t testing.TB, err, want error) {
	t.Helper()
	if err == nil {
		t.Fatalf("the guest's %v reached the caller as a success", want)
	}
	if errors.Is(err, ErrProtocol) {
		t.Fatalf("the guest's failure status was taken for a protocol violation: %v", err)
	}
	if got, code := status.Code(errgrpc.ToGRPC(err)), status.Code(want); got != code {
		t.Fatalf("the guest's %v code came back as %v: %v", code, got, err)
	}
}

// How a scripted helper call must end.
type ending int

const (
	endOK         ending = iota
	endStatus            // the guest's failure status, class intact
	endDecode            // a reply that does not decode: an error, no violation
	endProtocol          // a reply that breaks the API contract: ErrProtocol, client closed
	endNoProgress        // CopyInput: the guest took no byte, ErrFailedPrecondition
)

// requireEnding checks err and the client's state against how the call
// must end; fail is the status for endStatus.
func requireEnding(t testing.TB, c *Client, err error, end ending, fail error) {
	t.Helper()
	if end == endProtocol {
		requireProtocolError(t, err)
		requireProtocolError(t, c.Err())
		select {
		case <-c.Done():
		case <-time.After(fuzzCallTimeout):
			t.Fatal("Done not closed after a protocol violation")
		}
		return
	}
	if perr := c.Err(); perr != nil {
		t.Fatalf("client closed for a protocol violation (%v), want end %d with error %v", perr, end, err)
	}
	switch end {
	case endOK:
		if err != nil {
			t.Fatalf("want success, got %v", err)
		}
	case endStatus:
		requireStatusClass(t, err, fail)
	case endDecode:
		if err == nil || errors.Is(err, ErrProtocol) {
			t.Fatalf("an undecodable reply ended with %v, want an error that is no violation", err)
		}
	case endNoProgress:
		if !errdefs.IsFailedPrecondition(err) || errors.Is(err, ErrProtocol) {
			t.Fatalf("a guest that took no byte ended with %v, want ErrFailedPrecondition", err)
		}
	}
}

// replyCase is one method whose reply the client decodes.
type replyCase struct {
	method string
	// call calls the method through the client.
	call func(ctx context.Context, c *Client) (proto.Message, error)
	// zero returns an empty reply of the method's type.
	zero func() proto.Message
}

// nilMessage says m is nil or a typed nil pointer.
func nilMessage(m proto.Message) bool { return m == nil || !m.ProtoReflect().IsValid() }

// describe names a reply for failure messages.
func describe(m proto.Message) string {
	if nilMessage(m) {
		return "<nil>"
	}
	return fmt.Sprintf("%T %v", m, m)
}

// unary is the replyCase of a method of the API, called with req.
func unary[Req, Resp proto.Message](method string, call func(api.AgentService, context.Context, Req) (Resp, error), req Req) replyCase {
	return replyCase{
		method: method,
		call:   func(ctx context.Context, c *Client) (proto.Message, error) { return call(c, ctx, req) },
		zero: func() proto.Message {
			var m Resp
			return m.ProtoReflect().Type().New().Interface()
		},
	}
}

// replyCases lists the methods of the agent API, so every reply type the
// host decodes. The first twelve match replySeeds.
var replyCases = []replyCase{
	unary("Ping", api.AgentService.Ping, &api.PingRequest{}),
	unary("CreateContainer", api.AgentService.CreateContainer, &api.CreateContainerRequest{Id: testID}),
	unary("StartContainer", api.AgentService.StartContainer, &api.ContainerRequest{Id: testID}),
	unary("ExecProcess", api.AgentService.ExecProcess, &api.ExecProcessRequest{Id: testID, ExecId: testExecID}),
	unary("WaitProcess", api.AgentService.WaitProcess, &api.WaitProcessRequest{Id: testID}),
	unary("State", api.AgentService.State, &api.ContainerRequest{Id: testID}),
	unary("ListPids", api.AgentService.ListPids, &api.ContainerRequest{Id: testID}),
	unary("Stats", api.AgentService.Stats, &api.ContainerRequest{Id: testID}),
	unary("ReadStdio", api.AgentService.ReadStdio, &api.ReadStdioRequest{Id: testID, Max: ChunkSize}),
	unary("WriteStdin", api.AgentService.WriteStdin, &api.WriteStdinRequest{Id: testID, Data: []byte("x")}),
	unary("Events", api.AgentService.Events, &api.EventsRequest{}),
	unary("SignalProcess", api.AgentService.SignalProcess, &api.SignalProcessRequest{Id: testID, Signal: 9}),
	unary("CloseStdin", api.AgentService.CloseStdin, &api.CloseStdinRequest{Id: testID}),
	unary("DeleteContainer", api.AgentService.DeleteContainer, &api.DeleteContainerRequest{Id: testID}),
	unary("Shutdown", api.AgentService.Shutdown, &api.Empty{}),
	unary("ConfigureNetwork", api.AgentService.ConfigureNetwork, &api.ConfigureNetworkRequest{Id: testID}),
	unary("DeleteProcess", api.AgentService.DeleteProcess, &api.ProcessRequest{Id: testID, ExecId: testExecID}),
	unary("Pause", api.AgentService.Pause, &api.ContainerRequest{Id: testID}),
	unary("Resume", api.AgentService.Resume, &api.ContainerRequest{Id: testID}),
	unary("ResizePty", api.AgentService.ResizePty, &api.ResizePtyRequest{Id: testID, Width: 80, Height: 24}),
}

// replySeeds returns, for each method, a valid reply encoded.
func replySeeds() [][]byte {
	msgs := []proto.Message{
		&api.PingResponse{Version: testAgentVersion, Runtime: "crun", Kernel: "6.6.0", BootNs: 12345},
		&api.CreateContainerResponse{Pid: 7},
		&api.StartContainerResponse{Pid: 8},
		&api.ExecProcessResponse{Pid: 9},
		&api.WaitProcessResponse{Exited: true, ExitStatus: 137, ExitedAtUnixNs: 1 << 60, OomKilled: true},
		&api.StateResponse{Id: testID, Status: "running", Pid: 1},
		&api.ListPidsResponse{Pids: []uint32{1, 2, 1 << 31}},
		&api.StatsResponse{Metrics: []byte{0x0a, 0x02, 0x08, 0x01}},
		&api.ReadStdioResponse{Data: []byte("hello\n"), Eof: true},
		&api.WriteStdinResponse{Written: 1},
		&api.EventsResponse{Events: []*api.Event{{Seq: 1, Kind: api.EventKind_EXIT, Id: testID, Pid: 3, ExitStatus: 1, TimeUnixNs: 5}}, Missed: true},
		&api.Empty{},
	}
	out := make([][]byte, len(msgs))
	for i, m := range msgs {
		b, err := proto.Marshal(m)
		if err != nil {
			panic(err)
		}
		out[i] = b
	}
	return out
}

// FuzzReplyPayload feeds every method's reply with arbitrary bytes (sent
// by a real ttrpc server, so only the payload is hostile) or a failure
// status. Invariants: the call returns at once; a payload that decodes
// comes back as exactly that message, one that does not fails the call and
// returns no value; a failure status keeps its class; neither is taken for
// a protocol violation (the framing was right). For Ping, the ready wait of
// Dial returns the guest's answer and reseeds it.
func FuzzReplyPayload(f *testing.F) {
	for i, seed := range replySeeds() {
		f.Add(uint8(i), seed, uint8(0), "")
	}
	f.Add(uint8(0), []byte{0xff, 0xff}, uint8(0), "")                   // undecodable
	f.Add(uint8(5), []byte{0x12, 0x02, 0xff, 0xfe}, uint8(0), "")       // State.status not UTF-8
	f.Add(uint8(4), []byte(nil), uint8(codes.NotFound), "no such exec") // a failure status
	f.Add(uint8(8), []byte(nil), uint8(codes.DeadlineExceeded), "late")
	f.Fuzz(func(t *testing.T, sel uint8, payload []byte, code uint8, msg string) {
		if len(payload) > maxFuzzInput || len(msg) > maxFuzzInput {
			return
		}
		rc := replyCases[int(sel)%len(replyCases)]
		fail := guestStatus(code, msg)
		var (
			mu    sync.Mutex
			pings []*api.PingRequest
		)
		c := scriptedClient(t, func(method string, req []byte) ([]byte, error) {
			if method == "Ping" {
				var p api.PingRequest
				if err := proto.Unmarshal(req, &p); err != nil {
					return nil, err
				}
				mu.Lock()
				pings = append(pings, &p)
				mu.Unlock()
			}
			return payload, fail
		}, rc.method)
		ctx := fuzzCtx(t)
		got, err := rc.call(ctx, c)
		requireNoHang(t, ctx, err)
		if perr := c.Err(); perr != nil {
			t.Fatalf("a well-framed reply was taken for a protocol violation: %v", perr)
		}
		if fail != nil {
			requireStatusClass(t, err, fail)
			return
		}
		want := rc.zero()
		if derr := proto.Unmarshal(payload, want); derr != nil {
			if err == nil || !nilMessage(got) {
				t.Fatalf("%s: undecodable reply %x (%v) returned (%s, %v), want an error and no value", rc.method, payload, derr, describe(got), err)
			}
			return
		}
		if err != nil {
			t.Fatalf("%s: a reply that decodes failed the call: %v", rc.method, err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("%s: client decoded %v, guest sent %v", rc.method, got, want)
		}
		if rc.method != "Ping" {
			return
		}
		resp, err := c.waitReady(ctx, true)
		requireNoHang(t, ctx, err)
		if err != nil || !proto.Equal(resp, want) {
			t.Fatalf("waitReady = (%v, %v), want the guest's answer %v", resp, err, want)
		}
		mu.Lock()
		defer mu.Unlock()
		if last := pings[len(pings)-1]; len(last.Entropy) != entropyBytes || last.HostTimeUnixNs == 0 {
			t.Fatalf("the ready wait's last ping carried %d bytes of entropy and time %d", len(last.Entropy), last.HostTimeUnixNs)
		}
	})
}
