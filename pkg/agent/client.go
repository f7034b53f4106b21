// Package agent is the host side of the guest agent API: it dials the VM's
// virtio-serial socket, waits for boxlite-agent to answer, and bounds every
// call with a deadline and every message with a size limit. The guest is
// untrusted: a guest that sends garbage or oversized frames gets its
// connection closed and the caller sees ErrProtocol.
package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// Defaults for calls and long polls.
const (
	// DefaultCallTimeout bounds a call whose context has no deadline.
	DefaultCallTimeout = 30 * time.Second
	// pingAttempt bounds one readiness ping.
	pingAttempt = 2 * time.Second
	// pingRetryPause separates readiness pings that failed fast.
	pingRetryPause = 50 * time.Millisecond
	// ChunkSize is the most stdio bytes moved per call (the guest caps it too).
	ChunkSize = 1 << 20
)

// Long-poll timing. These are variables only so that tests can shorten them;
// nothing changes them at run time.
var (
	// pollWait is how long the guest holds a long poll (ReadStdio, WaitProcess, Events).
	pollWait = 10 * time.Second
	// pollMargin is added to pollWait for the host-side deadline of a long poll.
	pollMargin = 10 * time.Second
)

// Client is a connection to one guest agent. Its embedded api.AgentService
// methods may be called directly: each call without a deadline gets
// DefaultCallTimeout. Their errors carry the guest's errdefs class as a gRPC
// status: use errgrpc.ToNative to test it. The helpers (CopyOutput,
// CopyInput, Wait) return native errors.
type Client struct {
	api.AgentService

	tc    *ttrpc.Client
	guard *guardConn
	done  chan struct{}
}

// Dial connects to the agent behind the unix socket path (QEMU's chardev
// socket for the virtio-serial port) and waits until it answers Ping. ctx
// bounds the whole wait, which includes the guest's boot.
//
// The ready ping carries host entropy: the guest reseeds its random number
// generator with it, and runs no container before (a VM restored from a
// template wakes with the template's generator state).
func Dial(ctx context.Context, path string) (*Client, *api.PingResponse, error) {
	return dialAgent(ctx, path, true)
}

// Probe waits, bounded by ctx, until the agent at path answers a ping, then
// closes the connection. It sends no entropy: it is how a VM template is
// seen ready, and what the template's guest holds every clone inherits.
func Probe(ctx context.Context, path string) error {
	c, _, err := dialAgent(ctx, path, false)
	if err != nil {
		return err
	}
	return c.Close()
}

func dialAgent(ctx context.Context, path string, seed bool) (*Client, *api.PingResponse, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, nil, fmt.Errorf("dial agent socket %s: %w", path, err)
	}
	c := newClient(conn)
	resp, err := c.waitReady(ctx, seed)
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, resp, nil
}

// entropyBytes is how much host entropy the ready ping carries.
const entropyBytes = 64

// newClient wraps an established connection.
func newClient(conn net.Conn) *Client {
	g := newClientGuard(conn, MaxFrame)
	c := &Client{guard: g, done: make(chan struct{})}
	c.tc = ttrpc.NewClient(g,
		ttrpc.WithUnaryClientInterceptor(func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
			// A call whose ctx is already done is not sent: ttrpc would
			// send it, and its select may still pick the reply over
			// ctx.Done (a cancelled CopyInput wrote data that way).
			if err := ctx.Err(); err != nil {
				return err
			}
			// A call failed by a protocol violation reports it, not ttrpc.ErrClosed.
			return c.classify(deadlineInterceptor(ctx, req, resp, info, invoke))
		}),
		ttrpc.WithOnClose(func() { close(c.done) }),
	)
	c.AgentService = api.NewAgentClient(c.tc)
	return c
}

// deadlineInterceptor gives every call without a deadline the default one,
// on the host and in the guest.
func deadlineInterceptor(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCallTimeout)
		defer cancel()
		// ttrpc set the wire timeout from ctx before calling us: without
		// this the guest would see no deadline and never give up.
		req.TimeoutNano = DefaultCallTimeout.Nanoseconds()
	}
	err := invoke(ctx, req, resp)
	failed := err != nil || resp.GetStatus().GetCode() != 0
	if failed && !errors.Is(err, context.DeadlineExceeded) {
		if dl, _ := ctx.Deadline(); !time.Now().Before(dl) {
			// The guest holds the same deadline (req.TimeoutNano), and its
			// failure status can arrive before ttrpc notices ours: report
			// the call as timed out either way, so it is retried as one.
			if err == nil {
				err = errors.New(resp.GetStatus().GetMessage())
			}
			return fmt.Errorf("%w: guest: %v", context.DeadlineExceeded, err)
		}
	}
	return err
}

// waitReady pings until the agent answers or ctx ends. A ping sent before
// the guest opened its port stays buffered in the socket, so retries only
// cover a lost message; a late answer to an earlier ping is ignored by ttrpc.
func (c *Client) waitReady(ctx context.Context, seed bool) (*api.PingResponse, error) {
	for {
		attempt, cancel := context.WithTimeout(ctx, pingAttempt)
		resp, err := c.Ping(attempt, &api.PingRequest{})
		cancel()
		if err == nil {
			// That ping may have waited in the socket while the guest
			// booted: send the host's clock again, fresh, so the guest's
			// exit times match the host's.
			req := &api.PingRequest{HostTimeUnixNs: time.Now().UnixNano()}
			if seed {
				req.Entropy = make([]byte, entropyBytes)
				if _, err := rand.Read(req.Entropy); err != nil {
					return nil, fmt.Errorf("host entropy: %w", err)
				}
			}
			sctx, cancel := context.WithTimeout(ctx, pingAttempt)
			fresh, err := c.Ping(sctx, req)
			cancel()
			switch {
			case err == nil:
				resp = fresh
			case seed:
				// Without the reseed the guest runs no container.
				return nil, fmt.Errorf("reseed the guest: %w", err)
			}
			return resp, nil
		}
		if perr := c.Err(); perr != nil {
			return nil, perr
		}
		// A ping that failed fast (an error answer, not a timeout) is
		// retried after a pause, so a broken guest cannot make us spin.
		pause := time.NewTimer(pingRetryPause)
		select {
		case <-ctx.Done():
			pause.Stop()
			return nil, fmt.Errorf("agent not ready: %w (last error: %v)", ctx.Err(), err)
		case <-c.done:
			pause.Stop()
			return nil, fmt.Errorf("agent connection closed before it was ready: %v", err)
		case <-pause.C:
		}
	}
}

// Done is closed when the connection ends, for whatever reason.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns the protocol violation that closed the connection, or nil.
func (c *Client) Err() error { return c.guard.Err() }

// Close closes the connection. Calls in flight fail.
func (c *Client) Close() error {
	err := c.tc.Close()
	if errors.Is(err, ttrpc.ErrClosed) {
		return nil
	}
	return err
}

// fail closes the connection for a protocol violation found above the frame
// level (a reply that breaks the API contract), so that Err, Done and later
// calls report it like a violation the guard found. err must wrap
// ErrProtocol; fail returns it.
func (c *Client) fail(err error) error {
	c.guard.fail(err)
	c.Close()
	return err
}

// classify returns the protocol violation behind a failed call, if there is
// one, so callers can tell a broken guest from an ordinary error.
func (c *Client) classify(err error) error {
	if err == nil {
		return nil
	}
	if perr := c.Err(); perr != nil {
		return perr
	}
	// The guest's errdefs classes travel as gRPC status codes; restore them
	// so callers can use errdefs.IsNotFound and friends. Local errors (our
	// own deadlines) are left alone.
	var remote interface{ GRPCStatus() *status.Status }
	if errors.As(err, &remote) {
		return errgrpc.ToNative(err)
	}
	return err
}

// pollContext returns a context for a long poll of wait.
func pollContext(ctx context.Context, wait time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, wait+pollMargin)
}
