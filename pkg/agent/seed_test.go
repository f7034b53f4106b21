package agent

import (
	"bytes"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// pingRecorder is an agent that records every PingRequest it answers. When
// refuseEntropy is set it fails the pings that carry entropy, as a guest
// whose reseed failed does.
type pingRecorder struct {
	unimplementedAgent

	refuseEntropy bool

	mu    sync.Mutex
	pings []*api.PingRequest
}

func (p *pingRecorder) Ping(_ context.Context, req *api.PingRequest) (*api.PingResponse, error) {
	p.mu.Lock()
	p.pings = append(p.pings, proto.Clone(req).(*api.PingRequest))
	p.mu.Unlock()
	if p.refuseEntropy && len(req.Entropy) > 0 {
		// As the guest's service puts its errors on the wire.
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument)
	}
	return &api.PingResponse{Version: testAgentVersion}, nil
}

func (p *pingRecorder) got() []*api.PingRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*api.PingRequest(nil), p.pings...)
}

// closeNotingConn closes closed once the server side of a connection reads
// its end: the client hung up.
type closeNotingConn struct {
	net.Conn
	once   *sync.Once
	closed chan struct{}
}

func (c closeNotingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.once.Do(func() { close(c.closed) })
	}
	return n, err
}

// recordingAgent serves rec on a fresh socket and returns its path and a
// channel closed when the first connection's client hangs up.
func recordingAgent(t *testing.T, rec *pingRecorder) (string, <-chan struct{}) {
	t.Helper()
	ln, path := listen(t)
	closed := make(chan struct{})
	var once sync.Once
	serveAgent(t, &hookListener{Listener: ln, hook: func(c net.Conn) (net.Conn, error) {
		return closeNotingConn{Conn: c, once: &once, closed: closed}, nil
	}}, rec)
	return path, closed
}

func dialCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// Dial's second, fresh ping carries 64 bytes of host entropy (the guest
// runs no container before it reseeded with them), new at every Dial.
func TestDialSendsHostEntropy(t *testing.T) {
	checkLeaks(t)
	var seeds [][]byte
	for i := range 2 {
		rec := &pingRecorder{}
		path, _ := recordingAgent(t, rec)
		c, resp, err := Dial(dialCtx(t), path)
		if err != nil {
			t.Fatalf("Dial %d: %v", i, err)
		}
		if resp.GetVersion() != testAgentVersion {
			t.Errorf("Dial %d: ping version %q", i, resp.GetVersion())
		}
		pings := rec.got()
		if len(pings) != 2 {
			t.Fatalf("Dial %d sent %d pings, want 2 (ready, then fresh): %v", i, len(pings), pings)
		}
		if len(pings[0].Entropy) != 0 || pings[0].HostTimeUnixNs != 0 {
			t.Errorf("Dial %d: first ping %v, want an empty one", i, pings[0])
		}
		fresh := pings[1]
		if len(fresh.Entropy) != entropyBytes || entropyBytes != 64 {
			t.Fatalf("Dial %d: fresh ping carries %d bytes of entropy, want 64", i, len(fresh.Entropy))
		}
		if bytes.Equal(fresh.Entropy, make([]byte, 64)) {
			t.Errorf("Dial %d: entropy is all zeros", i)
		}
		if fresh.HostTimeUnixNs == 0 {
			t.Errorf("Dial %d: fresh ping lacks the host's time", i)
		}
		seeds = append(seeds, fresh.Entropy)
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if bytes.Equal(seeds[0], seeds[1]) {
		t.Fatalf("two Dials sent the same entropy %x", seeds[0])
	}
}

// Probe pings without entropy (what a template's guest holds every clone
// inherits) and hangs up.
func TestProbeSendsNoEntropyAndHangsUp(t *testing.T) {
	checkLeaks(t)
	rec := &pingRecorder{}
	path, closed := recordingAgent(t, rec)
	if err := Probe(dialCtx(t), path); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	waitClosed(t, closed, 5*time.Second, "Probe's connection")
	pings := rec.got()
	if len(pings) == 0 {
		t.Fatal("Probe sent no ping")
	}
	for i, p := range pings {
		if len(p.Entropy) != 0 {
			t.Errorf("Probe's ping %d carries %d bytes of entropy", i, len(p.Entropy))
		}
	}
}

// A guest that cannot reseed runs no container: Dial fails rather than hand
// back a client for it. Probe does not care.
func TestDialFailsWhenTheReseedFails(t *testing.T) {
	checkLeaks(t)
	rec := &pingRecorder{refuseEntropy: true}
	path, closed := recordingAgent(t, rec)
	c, _, err := Dial(dialCtx(t), path)
	if err == nil {
		c.Close()
		t.Fatal("Dial succeeded although the guest refused its entropy")
	}
	// The guest's class travels as a gRPC status (see Client).
	if !strings.Contains(err.Error(), "reseed the guest") || !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
		t.Fatalf("Dial err = %v, want the guest's InvalidArgument for the reseed", err)
	}
	waitClosed(t, closed, 5*time.Second, "the failed Dial's connection")
	if n := len(rec.got()); n != 2 {
		t.Fatalf("Dial sent %d pings, want 2: the entropy is not retried", n)
	}

	rec2 := &pingRecorder{refuseEntropy: true}
	path2, _ := recordingAgent(t, rec2)
	if err := Probe(dialCtx(t), path2); err != nil {
		t.Fatalf("Probe of the same guest: %v", err)
	}
}

func TestProbeFailsWithoutAnAgent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := Probe(ctx, "/nonexistent/boxlite/agent.sock"); err == nil || !strings.Contains(err.Error(), "dial agent socket") {
		t.Fatalf("Probe err = %v, want a dial error", err)
	}
}
