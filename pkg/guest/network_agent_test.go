package guest

import (
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	bxnetns "github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// newNetworkAgent returns an agent with container c1 in state s, whose init
// is p (nil for a fake one that is never looked at).
func newNetworkAgent(t *testing.T, s status, p *process) *Agent {
	t.Helper()
	a, err := New(Runtime{Name: "fake"}, nil, WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	c := &container{id: "c1", status: s, execs: map[string]*process{}, op: make(chan struct{}, 1), init: p}
	c.op <- struct{}{}
	a.publish(c.id, c)
	return a
}

func TestAgentConfigureNetworkChecksRequestAndContainer(t *testing.T) {
	valid := func(id string) *api.ConfigureNetworkRequest {
		req := validRequest()
		req.Id = id
		return req
	}
	invalid := valid("c1")
	invalid.Interfaces[0].Name = "lo"
	tests := []struct {
		name   string
		status status
		req    *api.ConfigureNetworkRequest
		is     func(error) bool
	}{
		{"invalid request", statusCreated, invalid, errdefs.IsInvalidArgument},
		{"unknown container", statusCreated, valid("c2"), errdefs.IsNotFound},
		{"no container id", statusCreated, valid(""), errdefs.IsNotFound},
		{"running container", statusRunning, valid("c1"), errdefs.IsFailedPrecondition},
		{"stopped container", statusStopped, valid("c1"), errdefs.IsFailedPrecondition},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newNetworkAgent(t, tt.status, nil)
			if err := a.ConfigureNetwork(t.Context(), tt.req); !tt.is(err) {
				t.Fatalf("err = %v", err)
			}
			// The service keeps the class on the wire.
			if _, err := NewService(a).ConfigureNetwork(t.Context(), tt.req); !tt.is(errgrpc.ToNative(err)) {
				t.Fatalf("service err = %v", err)
			}
		})
	}
}

// startInit starts `sleep` through the reaper as a container's init
// process, in a new network namespace when cloneflags say so, from a thread
// in ns. It is killed and reaped when the test ends.
func startInit(t *testing.T, r *reaper.Reaper, ns netns.NsHandle, cloneflags uintptr) *process {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: cloneflags}
	var handle *reaper.Process
	if err := inNetns(ns, func() (err error) {
		handle, err = r.Start(cmd)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killInit(t, handle) })
	return &process{cid: "c1", pid: handle.Pid(), handle: handle, exited: make(chan struct{})}
}

// killInit kills the process of handle and waits until it is reaped.
func killInit(t *testing.T, handle *reaper.Process) {
	t.Helper()
	_ = handle.Signal(unix.SIGKILL)
	select {
	case <-handle.Done():
	case <-time.After(testTimeout):
		t.Fatalf("pid %d not reaped", handle.Pid())
	}
}

// inNetns runs fn on a thread in ns (bxnetns.Do); fn does not run if the
// thread cannot enter ns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	return bxnetns.Do(nil, func() error {
		if err := netns.Set(ns); err != nil {
			return err
		}
		return fn()
	})
}

func TestAgentConfigureNetworkConfiguresTheInitsNamespace(t *testing.T) {
	requireNetAdmin(t)
	r := reaper.Default()
	checkLeaks(t)
	root := newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	p := startInit(t, r, root, syscall.CLONE_NEWNET)
	a := newNetworkAgent(t, statusCreated, p)
	target, err := netns.GetFromPid(p.pid)
	if err != nil {
		t.Fatal(err)
	}
	netnstest.Release(t, int(target), target.Close)

	req := &api.ConfigureNetworkRequest{Id: "c1", Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0", Addresses: []string{"10.4.0.2/24"}}}}
	// The agent finds the NICs in its own namespace: here the test's root.
	if err := inNetns(root, func() error { return a.ConfigureNetwork(t.Context(), req) }); err != nil {
		t.Fatal(err)
	}
	th := testHandle(t, target)
	if got := addrs(t, th, mustLink(t, th, "eth0")); !slices.Contains(got, "10.4.0.2/24") {
		t.Fatalf("eth0 in the init's namespace has addresses %v", got)
	}

	killInit(t, p.handle)
	err = inNetns(root, func() error { return a.ConfigureNetwork(t.Context(), req) })
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "has exited") {
		t.Fatalf("after the init exited: err = %v, want FailedPrecondition", err)
	}
}

func TestAgentConfigureNetworkRefusesTheVMsNamespace(t *testing.T) {
	requireNetAdmin(t)
	r := reaper.Default()
	checkLeaks(t)
	root := newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	// The init shares the agent's namespace: the spec asked for none.
	a := newNetworkAgent(t, statusCreated, startInit(t, r, root, 0))
	req := &api.ConfigureNetworkRequest{Id: "c1", Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "net0"}}}
	err := inNetns(root, func() error { return a.ConfigureNetwork(t.Context(), req) })
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "shares the VM's network namespace") {
		t.Fatalf("err = %v, want FailedPrecondition", err)
	}
	if names := netnstest.LinkNames(t, testHandle(t, root), ""); !slices.Contains(names, "eth0") {
		t.Fatalf("root namespace has links %v; eth0 should be untouched", names)
	}
}
