package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// A booting guest: QEMU's socket exists (so the host's connect succeeds) but
// the agent serves only later. A ping sent in the meantime must be answered
// once it does; a ping lost on the way must be retried. The lost-ping case
// takes one pingAttempt (2 s).
//
// Verified two-sided: with waitReady returning the first failed ping the
// lost-ping case fails.
func TestDialSucceedsOnceAgentAnswersPing(t *testing.T) {
	tests := []struct {
		name string
		// accept runs on the accepted connection before the agent serves it.
		accept func(t *testing.T, c net.Conn) (net.Conn, error)
	}{
		{
			name:   "agent already serving",
			accept: func(_ *testing.T, c net.Conn) (net.Conn, error) { return c, nil },
		},
		{
			// The agent starts serving only after the host's first ping is
			// already waiting in the socket.
			name: "agent starts serving after the first ping was sent",
			accept: func(_ *testing.T, c net.Conn) (net.Conn, error) {
				_, ping, err := readFrame(c)
				if err != nil {
					return nil, err
				}
				return replayConn{Conn: c, r: io.MultiReader(bytes.NewReader(ping), c)}, nil
			},
		},
		{
			// Slow: waits out one pingAttempt (2 s) before the retry.
			name: "first ping lost while the guest booted",
			accept: func(_ *testing.T, c net.Conn) (net.Conn, error) {
				if _, _, err := readFrame(c); err != nil {
					return nil, err
				}
				return c, nil
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			ln, path := listen(t)
			serveAgent(t, &hookListener{Listener: ln, hook: func(c net.Conn) (net.Conn, error) {
				return tt.accept(t, c)
			}}, &fakeAgent{})

			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, resp, err := Dial(ctx, path)
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			if resp.GetVersion() != testAgentVersion {
				t.Fatalf("Ping version = %q, want %q", resp.GetVersion(), testAgentVersion)
			}
			if c.Err() != nil {
				t.Fatalf("Err() = %v after a clean dial", c.Err())
			}
			select {
			case <-c.Done():
				t.Fatal("Done closed on a healthy connection")
			default:
			}
		})
	}
}

// Verified two-sided: without waitReady's ctx.Done case the first two cases
// spin until the watchdog; without its Done case "guest hangs up" waits out
// its 5 s deadline and reports the wrong error.
func TestDialFailsWhenAgentIsNotReady(t *testing.T) {
	tests := []struct {
		name string
		// guest sets up the other end and returns the socket path and a
		// channel closed when the guest saw the host hang up (nil: unchecked).
		guest   func(t *testing.T) (string, <-chan struct{})
		timeout time.Duration
		wantIs  error
		wantMsg string
	}{
		{
			name: "agent reads but never answers",
			guest: func(t *testing.T) (string, <-chan struct{}) {
				hungUp := make(chan struct{})
				path := rawGuest(t, func(c net.Conn) {
					defer close(hungUp)
					_, _ = io.Copy(io.Discard, c)
				})
				return path, hungUp
			},
			timeout: 300 * time.Millisecond,
			wantIs:  context.DeadlineExceeded,
			wantMsg: "agent not ready",
		},
		{
			name: "guest never accepts",
			guest: func(t *testing.T) (string, <-chan struct{}) {
				_, path := listen(t)
				return path, nil
			},
			timeout: 300 * time.Millisecond,
			wantIs:  context.DeadlineExceeded,
			wantMsg: "agent not ready",
		},
		{
			name: "guest hangs up",
			guest: func(t *testing.T) (string, <-chan struct{}) {
				return rawGuest(t, func(c net.Conn) { _, _, _ = readFrame(c) }), nil
			},
			timeout: 5 * time.Second,
			wantMsg: "closed before it was ready",
		},
		{
			name: "no socket",
			guest: func(t *testing.T) (string, <-chan struct{}) {
				return filepath.Join(t.TempDir(), "missing.sock"), nil
			},
			timeout: 5 * time.Second,
			wantIs:  fs.ErrNotExist,
			wantMsg: "dial agent socket",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			path, hungUp := tt.guest(t)
			ctx, cancel := context.WithTimeout(context.Background(), tt.timeout)
			defer cancel()
			start := time.Now()
			var (
				c    *Client
				resp *api.PingResponse
				err  error
			)
			within(t, tt.timeout+2*time.Second, func() { c, resp, err = Dial(ctx, path) })
			if err == nil {
				c.Close()
				t.Fatalf("Dial succeeded with %v", resp)
			}
			if c != nil || resp != nil {
				t.Fatalf("failed Dial returned client %v, response %v", c, resp)
			}
			if elapsed := time.Since(start); elapsed > tt.timeout+time.Second {
				t.Fatalf("Dial took %v with a %v deadline", elapsed, tt.timeout)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
			if errors.Is(err, ErrProtocol) {
				t.Fatalf("not-ready classified as a protocol violation: %v", err)
			}
			if hungUp != nil {
				waitClosed(t, hungUp, 2*time.Second, "host side of the failed dial")
			}
		})
	}
}

// violations are replies a broken or hostile guest sends for a request on
// stream id.
var violations = []struct {
	name  string
	reply func(id uint32) []byte
}{
	{"garbage", func(uint32) []byte { return []byte("HTTP/1.1 400 Bad Request\r\n\r\n") }},
	{"8 MiB frame", func(id uint32) []byte { return header(8<<20, id, frameTypeResp, 0) }},
	{"request frame", func(id uint32) []byte { return frame(id, frameTypeRequest, 0, nil) }},
	{"unknown frame type", func(id uint32) []byte { return frame(id, 0x7, 0, nil) }},
	{"even stream id", func(id uint32) []byte { return frame(id+1, frameTypeResp, 0, nil) }},
	{"unknown flags", func(id uint32) []byte { return frame(id, frameTypeResp, 0x40, nil) }},
}

// Verified two-sided: with the guard bypassed (newClient wrapping conn
// directly) every case fails: ttrpc logs and skips, or discards 8 MiB; with
// waitReady not checking Err after a failed ping every case reports "closed"
// instead of ErrProtocol.
func TestDialFailsWithErrProtocolOnBrokenGuest(t *testing.T) {
	for _, v := range violations {
		t.Run(v.name, func(t *testing.T) {
			checkLeaks(t)
			hungUp := make(chan struct{})
			path := rawGuest(t, func(c net.Conn) {
				defer close(hungUp)
				id, _, err := readFrame(c)
				if err != nil {
					return
				}
				_, _ = c.Write(v.reply(id))
				_, _ = io.Copy(io.Discard, c)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var (
				c   *Client
				err error
			)
			within(t, 3*time.Second, func() { c, _, err = Dial(ctx, path) })
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded against a broken guest")
			}
			requireProtocolError(t, err)
			waitClosed(t, hungUp, 2*time.Second, "connection to the broken guest")
		})
	}
}

// A guest that turns hostile after a clean Ping: the call in flight, the
// Client's Err and Done, and every later call report ErrProtocol.
//
// Verified two-sided: bypassing the guard makes every case fail; without
// classify in the client's interceptor the direct calls return
// ttrpc.ErrClosed instead of ErrProtocol (the bug this test found).
func TestProtocolViolationAfterDialClosesClient(t *testing.T) {
	phases := []struct {
		name string
		// unsolicited sends the violation without waiting for a request.
		unsolicited bool
	}{
		{"reply to a call", false},
		{"unsolicited", true},
	}
	for _, phase := range phases {
		for _, v := range violations {
			t.Run(phase.name+"/"+v.name, func(t *testing.T) {
				checkLeaks(t)
				hungUp := make(chan struct{})
				// dialed holds an unsolicited violation back until Dial
				// has returned: sent earlier, it (rightly) fails Dial,
				// which the test above covers.
				dialed := make(chan struct{})
				path := rawGuest(t, func(c net.Conn) {
					defer close(hungUp)
					// Dial pings twice: to find the agent, then with
					// the host's clock. Both are answered.
					var id uint32
					for range 2 {
						var err error
						if id, _, err = readFrame(c); err != nil {
							return
						}
						if _, err := c.Write(pingReply(t, id)); err != nil {
							return
						}
					}
					if phase.unsolicited {
						<-dialed
					} else {
						var err error
						if id, _, err = readFrame(c); err != nil {
							return
						}
					}
					_, _ = c.Write(v.reply(id))
					_, _ = io.Copy(io.Discard, c)
				})
				c := dial(t, path)
				close(dialed)

				if !phase.unsolicited {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err := c.State(ctx, &api.ContainerRequest{Id: "c1"})
					cancel()
					requireProtocolError(t, err)
				}
				waitClosed(t, c.Done(), 2*time.Second, "Done")
				requireProtocolError(t, c.Err())
				waitClosed(t, hungUp, 2*time.Second, "connection to the broken guest")

				_, err := c.State(context.Background(), &api.ContainerRequest{Id: "c1"})
				requireProtocolError(t, err)
				if err := c.Close(); err != nil {
					t.Fatalf("Close after a violation: %v", err)
				}
			})
		}
	}
}

// The guest learns the call's deadline too: it bounds its own work (a
// blocked stdin write, a long poll) by it.
//
// Verified two-sided: without the interceptor setting req.TimeoutNano (the
// bug this test found) the "no deadline" case sees no deadline in the guest.
func TestCallDeadlineReachesGuest(t *testing.T) {
	tests := []struct {
		name     string
		deadline time.Duration // 0: the caller sets none
		want     time.Duration
	}{
		{"no deadline gets DefaultCallTimeout", 0, DefaultCallTimeout},
		{"shorter caller deadline is kept", 5 * time.Second, 5 * time.Second},
		{"longer caller deadline is kept", 2 * time.Minute, 2 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			seen := make(chan time.Time, 1)
			c := startClient(t, &fakeAgent{state: func(ctx context.Context, _ *api.ContainerRequest) (*api.StateResponse, error) {
				dl, ok := ctx.Deadline()
				if !ok {
					dl = time.Time{}
				}
				seen <- dl
				return &api.StateResponse{Id: "c1"}, nil
			}})
			ctx := context.Background()
			if tt.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.deadline)
				defer cancel()
			}
			start := time.Now()
			if _, err := c.State(ctx, &api.ContainerRequest{Id: "c1"}); err != nil {
				t.Fatalf("State: %v", err)
			}
			dl := <-seen
			if dl.IsZero() {
				t.Fatal("guest saw no deadline")
			}
			if got := dl.Sub(start); got < tt.want-time.Second || got > tt.want+time.Second {
				t.Fatalf("guest deadline is %v after the call, want about %v", got, tt.want)
			}
		})
	}
}

// The host side of the same contract: the call itself is bounded.
//
// Verified two-sided: removing the interceptor's WithTimeout, or its
// req.TimeoutNano, fails the "no deadline" case.
func TestDeadlineInterceptorBoundsCallsWithoutDeadline(t *testing.T) {
	tests := []struct {
		name     string
		deadline time.Duration
		want     time.Duration
	}{
		{"no deadline", 0, DefaultCallTimeout},
		{"caller deadline", 3 * time.Second, 3 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.deadline)
				defer cancel()
			}
			req := &ttrpc.Request{}
			if dl, ok := ctx.Deadline(); ok {
				// What ttrpc's Client.Call does before the interceptor runs.
				req.TimeoutNano = time.Until(dl).Nanoseconds()
			}
			start := time.Now()
			var invoked bool
			err := deadlineInterceptor(ctx, req, &ttrpc.Response{}, &ttrpc.UnaryClientInfo{},
				func(ctx context.Context, req *ttrpc.Request, _ *ttrpc.Response) error {
					invoked = true
					dl, ok := ctx.Deadline()
					if !ok {
						t.Fatal("call has no deadline")
					}
					if got := dl.Sub(start); got < tt.want-time.Second || got > tt.want+100*time.Millisecond {
						t.Fatalf("call deadline %v after start, want about %v", got, tt.want)
					}
					if got := time.Duration(req.TimeoutNano); got < tt.want-time.Second || got > tt.want {
						t.Fatalf("wire timeout %v, want about %v", got, tt.want)
					}
					return nil
				})
			if err != nil || !invoked {
				t.Fatalf("interceptor: err=%v invoked=%v", err, invoked)
			}
		})
	}
}

// statusResponse returns a ttrpc response carrying a failure status, as the
// guest sends when its handler fails. It is built from wire bytes so the test
// needs no grpc import.
func statusResponse(t *testing.T, code int32, msg string) *ttrpc.Response {
	t.Helper()
	var st []byte
	st = protowire.AppendTag(st, 1, protowire.VarintType)
	st = protowire.AppendVarint(st, uint64(code))
	st = protowire.AppendTag(st, 2, protowire.BytesType)
	st = protowire.AppendString(st, msg)
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, st)
	resp := &ttrpc.Response{}
	if err := proto.Unmarshal(b, resp); err != nil || resp.GetStatus().GetCode() != code {
		t.Fatalf("build status response: %v", err)
	}
	return resp
}

// The guest holds the same deadline as the host (req.TimeoutNano), so its
// "deadline exceeded" can beat ttrpc's own: a call that fails once its
// deadline passed must still wrap context.DeadlineExceeded, or the long polls
// give up instead of retrying and callers cannot recognise their timeout.
// Failures before the deadline pass through untouched.
//
// Verified two-sided: without the normalisation in deadlineInterceptor the
// "after the deadline" cases fail. (The end-to-end race it fixes is also hit
// by TestCopyOutputRetriesLostPollsWithoutDuplicating and the Wait tests,
// but only some of the time.)
func TestDeadlineInterceptorReportsLateFailureAsDeadlineExceeded(t *testing.T) {
	const codeDeadlineExceeded, codeNotFound = 4, 5
	errTransport := errors.New("connection reset")
	tests := []struct {
		name string
		// expired runs the call with a deadline already passed.
		expired bool
		// invoke plays ttrpc's dispatch: a transport error, or a response
		// whose status Call turns into an error after the interceptor.
		invokeErr error
		status    int32
		wantIs    error // nil: the interceptor must return nil
		wantMsg   string
	}{
		{name: "guest deadline status after the deadline", expired: true, status: codeDeadlineExceeded,
			wantIs: context.DeadlineExceeded, wantMsg: "guest: guest gave up"},
		{name: "other guest failure after the deadline", expired: true, status: codeNotFound,
			wantIs: context.DeadlineExceeded, wantMsg: "guest gave up"},
		{name: "transport error after the deadline", expired: true, invokeErr: errTransport,
			wantIs: context.DeadlineExceeded, wantMsg: errTransport.Error()},
		{name: "local deadline error kept as is", expired: true, invokeErr: context.DeadlineExceeded,
			wantIs: context.DeadlineExceeded, wantMsg: "context deadline exceeded"},
		{name: "guest failure before the deadline", status: codeNotFound},
		{name: "transport error before the deadline", invokeErr: errTransport, wantIs: errTransport},
		{name: "success after the deadline", expired: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := time.Minute
			if tt.expired {
				d = -time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), d)
			defer cancel()
			err := deadlineInterceptor(ctx, &ttrpc.Request{}, &ttrpc.Response{}, &ttrpc.UnaryClientInfo{},
				func(_ context.Context, _ *ttrpc.Request, resp *ttrpc.Response) error {
					if tt.status != 0 {
						*resp = *statusResponse(t, tt.status, "guest gave up")
					}
					return tt.invokeErr
				})
			if tt.wantIs == nil {
				if err != nil {
					t.Fatalf("interceptor = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
			if strings.Count(err.Error(), "context deadline exceeded") > 1 {
				t.Fatalf("error %q repeats itself", err)
			}
		})
	}
}
