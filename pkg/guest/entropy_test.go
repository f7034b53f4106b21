package guest

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// fakeReseeder records the entropy an agent was given instead of handing it
// to the kernel; err, when set, is what it fails with.
type fakeReseeder struct {
	mu    sync.Mutex
	calls [][]byte
	err   error
}

func (f *fakeReseeder) reseed(b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, bytes.Clone(b))
	return f.err
}

func (f *fakeReseeder) got() [][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// reseedAgent returns an agent with a fake runtime and a fake reseeder.
func reseedAgent(t *testing.T, opts ...Option) (*Agent, *fakeReseeder) {
	t.Helper()
	a, err := New(Runtime{Name: "fake"}, nil, append([]Option{WithStateDir(t.TempDir())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeReseeder{}
	a.reseed = f.reseed
	return a, f
}

// createReq is a request Create checks the id of, then refuses for its
// missing share tag, before it mounts or runs anything.
func createReq() *api.CreateContainerRequest { return &api.CreateContainerRequest{Id: "c1"} }

// requireNotReseeded fails unless err is Create's refusal to run before a
// reseed.
func requireNotReseeded(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, errNotReseeded) || !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "reseeded") {
		t.Fatalf("Create err = %v, want FailedPrecondition saying the guest was not reseeded", err)
	}
}

// requirePastReseedCheck fails unless err comes from after the reseed
// check: here, the missing share tag.
func requirePastReseedCheck(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, errNotReseeded) || errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Create err = %v: still refused for the reseed", err)
	}
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "share tag") {
		t.Fatalf("Create err = %v, want the share tag's InvalidArgument (the next check)", err)
	}
}

func TestCreateWaitsForTheReseed(t *testing.T) {
	a, f := reseedAgent(t, WithReseedRequired())
	_, err := a.Create(t.Context(), createReq())
	requireNotReseeded(t, err)
	// The refusal reserves nothing.
	if n := len(a.containers); n != 0 {
		t.Fatalf("%d containers after a refused Create", n)
	}
	// An invalid id is still reported as such.
	if _, err := a.Create(t.Context(), &api.CreateContainerRequest{Id: "../x"}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Create of a bad id: err = %v, want InvalidArgument", err)
	}
	// So is the service's answer.
	if _, err := NewService(a).CreateContainer(t.Context(), createReq()); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) ||
		!strings.Contains(err.Error(), "reseeded") {
		t.Fatalf("service CreateContainer err = %v, want FailedPrecondition", err)
	}

	seed := []byte("sixty-four bytes of host entropy, well, a stand-in for them.....")
	if err := a.Reseed(seed); err != nil {
		t.Fatalf("Reseed: %v", err)
	}
	if got := f.got(); len(got) != 1 || !bytes.Equal(got[0], seed) {
		t.Fatalf("reseeder got %q, want one call with %q", got, seed)
	}
	_, err = a.Create(t.Context(), createReq())
	requirePastReseedCheck(t, err)
	if n := len(a.containers); n != 0 {
		t.Fatalf("%d containers after a failed Create", n)
	}
}

func TestCreateWithoutReseedRequiredIsNotRefused(t *testing.T) {
	a, f := reseedAgent(t)
	_, err := a.Create(t.Context(), createReq())
	requirePastReseedCheck(t, err)
	if got := f.got(); len(got) != 0 {
		t.Fatalf("reseeder called %d times", len(got))
	}
}

func TestFailedReseedLeavesTheAgentUnreseeded(t *testing.T) {
	a, f := reseedAgent(t, WithReseedRequired())
	f.err = errors.New("RNDADDENTROPY: operation not permitted")
	if err := a.Reseed([]byte("entropy")); err == nil || !strings.Contains(err.Error(), "RNDADDENTROPY") {
		t.Fatalf("Reseed err = %v, want the reseeder's", err)
	}
	if a.reseeded.Load() {
		t.Fatal("agent reseeded after its reseeder failed")
	}
	_, err := a.Create(t.Context(), createReq())
	requireNotReseeded(t, err)

	// A later reseed that works lets containers run.
	f.err = nil
	if err := a.Reseed([]byte("entropy")); err != nil {
		t.Fatal(err)
	}
	_, err = a.Create(t.Context(), createReq())
	requirePastReseedCheck(t, err)
}

func TestPingReseedsWithTheHostsEntropy(t *testing.T) {
	a, f := reseedAgent(t, WithReseedRequired())
	svc := NewService(a)
	// A ping without entropy (the template's readiness probe) reseeds
	// nothing. HostTimeUnixNs stays 0: setting it would step this host's
	// clock.
	if resp, err := svc.Ping(t.Context(), &api.PingRequest{}); err != nil || resp.GetRuntime() != "fake" {
		t.Fatalf("Ping = %v, %v", resp, err)
	}
	if got := f.got(); len(got) != 0 {
		t.Fatalf("ping without entropy reseeded with %q", got)
	}
	if a.reseeded.Load() {
		t.Fatal("reseeded by a ping without entropy")
	}

	entropy := make([]byte, 64)
	if _, err := rand.Read(entropy); err != nil {
		t.Fatal(err)
	}
	if resp, err := svc.Ping(t.Context(), &api.PingRequest{Entropy: entropy}); err != nil || resp.GetRuntime() != "fake" {
		t.Fatalf("Ping with entropy = %v, %v", resp, err)
	}
	if got := f.got(); len(got) != 1 || !bytes.Equal(got[0], entropy) {
		t.Fatalf("reseeder got %x, want one call with %x", got, entropy)
	}
	if !a.reseeded.Load() {
		t.Fatal("not reseeded by a ping with entropy")
	}
	_, err := a.Create(t.Context(), createReq())
	requirePastReseedCheck(t, err)
}

func TestPingFailsWhenTheReseedFails(t *testing.T) {
	a, f := reseedAgent(t, WithReseedRequired())
	f.err = fmt.Errorf("host entropy of 300 bytes: want 1 to 256: %w", errdefs.ErrInvalidArgument)
	_, err := NewService(a).Ping(t.Context(), &api.PingRequest{Entropy: []byte{1}})
	if !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
		t.Fatalf("Ping err = %v, want the reseed's InvalidArgument on the wire", err)
	}
	if a.reseeded.Load() {
		t.Fatal("reseeded although the reseed failed")
	}
}

func TestReseedRejectsBadSizes(t *testing.T) {
	for _, n := range []int{0, maxEntropy + 1, 4096} {
		err := reseed(make([]byte, n))
		if !errdefs.IsInvalidArgument(err) {
			// As root a kernel call would have succeeded; as another user
			// it fails with EPERM: either way not InvalidArgument.
			t.Errorf("reseed(%d bytes) = %v, want InvalidArgument", n, err)
		}
	}
	if err := reseed(nil); !errdefs.IsInvalidArgument(err) {
		t.Errorf("reseed(nil) = %v, want InvalidArgument", err)
	}
}

func TestReseedFeedsTheKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("RNDADDENTROPY and RNDRESEEDCRNG need CAP_SYS_ADMIN: run go test as root")
	}
	for _, n := range []int{1, 3, 64, maxEntropy} {
		b := make([]byte, n)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		if err := reseed(b); err != nil {
			t.Fatalf("reseed(%d random bytes): %v", n, err)
		}
	}
}
