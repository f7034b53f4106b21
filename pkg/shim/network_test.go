package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
	"github.com/boxlite/boxlite/pkg/network"
)

// netSpec is a spec with the given network namespace entries and
// annotations.
func netSpec(ann map[string]string, namespaces ...specs.LinuxNamespace) *specs.Spec {
	s := &specs.Spec{Annotations: ann, Linux: &specs.Linux{}}
	s.Linux.Namespaces = append([]specs.LinuxNamespace{{Type: specs.PIDNamespace}}, namespaces...)
	return s
}

// netEntry is a network namespace entry with path.
func netEntry(path string) specs.LinuxNamespace {
	return specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: path}
}

// assertNoNetState fails the test if dir holds a network state file.
func assertNoNetState(t *testing.T, dir string) {
	t.Helper()
	if ents, _ := os.ReadDir(dir); len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("state dir holds %v, want nothing", names)
	}
}

// Specs that cannot give a box a network are refused before anything is
// made, each saying why.
func TestNewBoxNetworkRefusesSpecsWithoutAUsableNetwork(t *testing.T) {
	user := map[string]string{AnnotationNetwork: "user"}
	for _, tc := range []struct {
		name string
		spec *specs.Spec
		want string
	}{
		{name: "no linux section", spec: &specs.Spec{},
			want: "the spec has no network namespace, which asks for the host's network: a VM cannot share it"},
		{name: "no network namespace", spec: netSpec(nil),
			want: "the spec has no network namespace, which asks for the host's network"},
		{name: "user networking and a namespace path", spec: netSpec(user, netEntry("/var/run/netns/cni-1")),
			want: "annotation io.boxlite.network=user and the network namespace /var/run/netns/cni-1 both choose the box's network"},
		{name: "unknown network mode", spec: netSpec(map[string]string{AnnotationNetwork: "bridge"}, netEntry("")),
			want: `annotation io.boxlite.network="bridge": want "user" or "none"`},
		{name: "ports without user networking", spec: netSpec(map[string]string{AnnotationPorts: "8080:80"}, netEntry("")),
			want: "annotation io.boxlite.network.ports needs io.boxlite.network=user"},
		{name: "no network and a namespace path", spec: netSpec(map[string]string{AnnotationNetwork: "none"}, netEntry("/var/run/netns/cni-1")),
			want: "annotation io.boxlite.network=none and the network namespace /var/run/netns/cni-1 both choose the box's network"},
		{name: "a bad port", spec: netSpec(map[string]string{AnnotationNetwork: "user", AnnotationPorts: "8080:80,8080"}),
			want: `annotation io.boxlite.network.ports: port "8080": wrong number of fields`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			n, err := newBoxNetwork(tc.spec, dir)
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("newBoxNetwork() = %v, %v; want invalid argument containing %q", n, err, tc.want)
			}
			assertNoNetState(t, dir)
		})
	}
}

func TestParsePorts(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		bad  string
	}{
		{in: "", want: nil},
		{in: " , ,, ", want: nil},
		{in: "8080:80", want: []string{"8080:80/tcp"}},
		{in: " 8080:80 , ,127.0.0.1:5353:53/udp,", want: []string{"8080:80/tcp", "127.0.0.1:5353:53/udp"}},
		{in: "8080:80, 9090:0", bad: `annotation io.boxlite.network.ports: port "9090:0": box port must be 1 to 65535`},
		{in: "8080:80 9090:90", bad: `port "8080:80 9090:90"`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parsePorts(tc.in)
			if tc.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.bad) {
					t.Fatalf("parsePorts(%q) = %v, %v; want invalid argument containing %q", tc.in, got, err, tc.bad)
				}
				return
			}
			var strs []string
			for _, f := range got {
				strs = append(strs, f.String())
			}
			if err != nil || !slices.Equal(strs, tc.want) {
				t.Fatalf("parsePorts(%q) = %q, %v; want %q", tc.in, strs, err, tc.want)
			}
		})
	}
}

// With user networking the box gets one NIC with QEMU's user networking
// and the fixed MAC, its published ports, and no namespace or state file;
// a network namespace entry without a path does not get in the way.
func TestUserNetworkIsOneUserNIC(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec *specs.Spec
	}{
		{name: "no network namespace", spec: &specs.Spec{Annotations: map[string]string{
			AnnotationNetwork: "user", AnnotationPorts: "8080:80, 127.0.0.1:5353:53/udp"}}},
		{name: "a network namespace without a path", spec: netSpec(map[string]string{
			AnnotationNetwork: "user", AnnotationPorts: "8080:80, 127.0.0.1:5353:53/udp"}, netEntry(""))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			n, err := newBoxNetwork(tc.spec, dir)
			if err != nil {
				t.Fatal(err)
			}
			if n.ns != nil || n.path != "" || len(n.taps) != 0 {
				t.Errorf("user networking made a namespace %v (%q) or taps %v", n.ns, n.path, n.taps)
			}
			nics := n.nics()
			if len(nics) != 1 || nics[0].MAC.String() != "52:54:00:12:34:56" || nics[0].Tap != nil || nics[0].User != n.user {
				t.Fatalf("nics() = %+v; want one user NIC with MAC 52:54:00:12:34:56", nics)
			}
			var fwds []string
			for _, f := range nics[0].User.Forwards {
				fwds = append(fwds, f.String())
			}
			if want := []string{"8080:80/tcp", "127.0.0.1:5353:53/udp"}; !slices.Equal(fwds, want) {
				t.Errorf("forwards = %q, want %q", fwds, want)
			}
			req, err := n.wire(testCtx(t, testTimeout), "box1")
			if err != nil || !proto.Equal(req, userConfig("box1")) {
				t.Errorf("wire() = %v, %v; want the user network's configuration", req, err)
			}
			if err := n.teardown(); err != nil {
				t.Errorf("teardown() = %v", err)
			}
			assertNoNetState(t, dir)
		})
	}
}

func TestUserConfigIsQEMUsDefaultNetwork(t *testing.T) {
	want := &api.ConfigureNetworkRequest{
		Id: "box1",
		Interfaces: []*api.Interface{{
			DeviceMac: "52:54:00:12:34:56", Name: "eth0", Mtu: 1500, Addresses: []string{"10.0.2.15/24"},
		}},
		Routes: []*api.Route{{Gateway: "10.0.2.2", Device: "eth0"}},
	}
	if got := userConfig("box1"); !proto.Equal(got, want) {
		t.Errorf("userConfig() =\n%v\nwant\n%v", got, want)
	}
}

func mustCIDR(t *testing.T, s string) *net.IPNet {
	t.Helper()
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	n.IP = ip
	return n
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// The namespace's configuration reaches the guest as strings it parses:
// addresses in CIDR notation with their host part, default routes as
// netlink reports them (0.0.0.0/0, ::/0), no gateway for a link-scope
// route.
func TestGuestConfigConvertsTheNamespacesConfiguration(t *testing.T) {
	cfg := &network.Config{
		Interfaces: []network.Interface{{
			DeviceMAC: mustMAC(t, "02:aa:bb:cc:dd:01"), Name: "eth0", MAC: mustMAC(t, "0a:58:0a:04:00:02"), MTU: 1450,
			Addrs: []*net.IPNet{mustCIDR(t, "10.4.0.2/24"), mustCIDR(t, "fd00:4::2/64")},
		}},
		Routes: []network.Route{
			{Dst: mustCIDR(t, "10.5.0.0/16"), Dev: "eth0", Scope: netlink.SCOPE_LINK},
			{Dst: mustCIDR(t, "0.0.0.0/0"), Gw: net.ParseIP("10.4.0.1"), Dev: "eth0", Metric: 100},
			{Dst: mustCIDR(t, "::/0"), Gw: net.ParseIP("fd00:4::1"), Src: net.ParseIP("fd00:4::2"), Dev: "eth0", Metric: 1024},
		},
		Neighbors: []network.Neighbor{{IP: net.ParseIP("10.4.0.1"), MAC: mustMAC(t, "0a:58:0a:04:00:01"), Dev: "eth0"}},
	}
	want := &api.ConfigureNetworkRequest{
		Id: "box1",
		Interfaces: []*api.Interface{{
			DeviceMac: "02:aa:bb:cc:dd:01", Name: "eth0", Mac: "0a:58:0a:04:00:02", Mtu: 1450,
			Addresses: []string{"10.4.0.2/24", "fd00:4::2/64"},
		}},
		Routes: []*api.Route{
			{Dest: "10.5.0.0/16", Device: "eth0", Scope: 253},
			{Dest: "0.0.0.0/0", Gateway: "10.4.0.1", Device: "eth0", Metric: 100},
			{Dest: "::/0", Gateway: "fd00:4::1", Source: "fd00:4::2", Device: "eth0", Metric: 1024},
		},
		Neighbors: []*api.Neighbor{{Ip: "10.4.0.1", Mac: "0a:58:0a:04:00:01", Device: "eth0"}},
	}
	if got := guestConfig("box1", cfg); !proto.Equal(got, want) {
		t.Errorf("guestConfig() =\n%v\nwant\n%v", got, want)
	}
	if got := guestConfig("box1", &network.Config{}); !proto.Equal(got, &api.ConfigureNetworkRequest{Id: "box1"}) {
		t.Errorf("guestConfig() of nothing = %v", got)
	}
}

// The delete action has nothing to undo without a record of a wired
// namespace, or when the namespace is gone.
func TestUnwireStaleWithNothingToUndo(t *testing.T) {
	for _, tc := range []struct {
		name  string
		state string // netns.json's content; "" for no file
	}{
		{name: "no state file"},
		{name: "namespace gone", state: `{"netns": "/nonexistent/netns/cni-1", "wired": ["eth0"]}`},
		{name: "nothing wired", state: `{"netns": "/nonexistent/netns/cni-1"}`},
		{name: "a shim-made namespace", state: `{"wired": ["eth0"]}`},
		{name: "garbage", state: `{not json`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.state != "" {
				if err := os.WriteFile(filepath.Join(dir, netStateFile), []byte(tc.state), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if err := unwireStale(dir); err != nil {
				t.Errorf("unwireStale() = %v, want nil", err)
			}
		})
	}
}

func TestNewBoxNetworkRefusesABadNamespacePath(t *testing.T) {
	requireRoot(t)
	checkLeaks(t)
	notNS := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notNS, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		path string
		is   error
		want string
	}{
		{name: "missing", path: "/nonexistent/netns/cni-1", is: errdefs.ErrNotFound,
			want: "network namespace /nonexistent/netns/cni-1 does not exist"},
		{name: "not a namespace", path: notNS, is: errdefs.ErrInvalidArgument, want: notNS + " is not a network namespace"},
		{name: "another kind of namespace", path: "/proc/self/ns/uts", is: errdefs.ErrInvalidArgument,
			want: "/proc/self/ns/uts is not a network namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			n, err := newBoxNetwork(netSpec(nil, netEntry(tc.path)), dir)
			if !errors.Is(err, tc.is) || !strings.Contains(fmt.Sprint(err), tc.want) {
				t.Fatalf("newBoxNetwork() = %v, %v; want %v containing %q", n, err, tc.is, tc.want)
			}
			assertNoNetState(t, dir)
		})
	}
}

// A network entry without a path gets a namespace of the shim's own, with
// one tap (a random locally administered MAC) for a network configured
// later; teardown closes the tap and the namespace, which is then gone.
func TestNewBoxNetworkCreatesANamespaceForAnEntryWithoutAPath(t *testing.T) {
	requireRoot(t)
	checkLeaks(t)
	dir := t.TempDir()
	n, err := newBoxNetwork(netSpec(nil, netEntry("")), dir)
	if err != nil {
		t.Fatal(err)
	}
	if n.ns == nil || n.path != "" || n.user != nil {
		n.teardown()
		t.Fatalf("newBoxNetwork() = ns %v, path %q, user %v; want a new namespace", n.ns, n.path, n.user)
	}
	// Our own reference, to look into the namespace after teardown.
	ref, err := netns.Open(fmt.Sprintf("/proc/self/fd/%d", n.ns.Fd()))
	if err != nil {
		n.teardown()
		t.Fatal(err)
	}
	id := netnstest.FileID(t, ref)
	own, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if netnstest.FileID(t, own) == id {
		t.Errorf("the box's namespace is the test's own")
	}
	own.Close()
	h := netnstest.Handle(t, ref)

	nics := n.nics()
	if len(nics) != 1 || nics[0].Tap == nil || nics[0].User != nil {
		t.Fatalf("nics() = %+v; want one tap NIC", nics)
	}
	if mac := nics[0].MAC; len(mac) != 6 || mac[0]&1 != 0 || mac[0]&2 == 0 {
		t.Errorf("NIC MAC %s is not a locally administered unicast address", mac)
	}
	if got := netnstest.LinkNames(t, h, network.TapPrefix); !slices.Equal(got, []string{network.TapPrefix + "0"}) {
		t.Errorf("taps in the namespace: %q, want %s0", got, network.TapPrefix)
	}
	// Nothing configured the namespace: the box starts with loopback only.
	if req, err := n.wire(testCtx(t, testTimeout), "box1"); req != nil || err != nil {
		t.Errorf("wire() of an empty namespace = %v, %v; want nothing to configure", req, err)
	}
	if err := n.teardown(); err != nil {
		t.Errorf("teardown() = %v", err)
	}
	poll.Until(t, "the tap goes with its descriptor", func() error {
		if taps := netnstest.LinkNames(t, h, network.TapPrefix); len(taps) > 0 {
			return fmt.Errorf("taps left: %v", taps)
		}
		return nil
	})
	assertNoNetState(t, dir)
	h.Close()
	ref.Close()
	netnstest.WaitReleased(t, id)
}

// boxNS is a named network namespace as CNI leaves it: eth0 (the peer of
// peer0, both in it) with addresses, a default route, a link-scope route
// and a permanent neighbour.
type boxNS struct {
	path string
	ns   *os.File
	h    *netlink.Handle
	mac  net.HardwareAddr
}

// newBoxNS makes a boxNS, bind-mounted at a path like `ip netns add` does;
// unmounted and closed when the test ends.
func newBoxNS(t *testing.T) *boxNS {
	t.Helper()
	ns := netnstest.New(t)
	path := filepath.Join(t.TempDir(), "cni-test")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", ns.Fd()), path, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind the namespace at %s: %v", path, err)
	}
	// Registered after New's: runs before the namespace is closed.
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", path, err)
		}
	})
	b := &boxNS{path: path, ns: ns, h: netnstest.Handle(t, ns)}
	if err := b.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "peer0"}); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	eth0, peer := b.link(t, "eth0"), b.link(t, "peer0")
	for _, l := range []netlink.Link{eth0, peer} {
		if err := b.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	b.mac = eth0.Attrs().HardwareAddr
	for _, cidr := range []string{"10.9.0.2/24", "fd00:9::2/64"} {
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			t.Fatal(err)
		}
		a.Flags = unix.IFA_F_NODAD
		if err := b.h.AddrAdd(eth0, a); err != nil {
			t.Fatalf("add %s: %v", cidr, err)
		}
	}
	idx := eth0.Attrs().Index
	for _, r := range []*netlink.Route{
		{LinkIndex: idx, Gw: net.ParseIP("10.9.0.1")},
		{LinkIndex: idx, Dst: mustCIDR(t, "10.10.0.0/16"), Scope: netlink.SCOPE_LINK},
	} {
		if err := b.h.RouteAdd(r); err != nil {
			t.Fatalf("add route %v: %v", r, err)
		}
	}
	if err := b.h.NeighAdd(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP("10.9.0.1"), HardwareAddr: mustMAC(t, "02:00:00:00:00:01")}); err != nil {
		t.Fatalf("add neighbour: %v", err)
	}
	return b
}

func (b *boxNS) link(t *testing.T, name string) netlink.Link {
	t.Helper()
	l, err := b.h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// hasIngress says eth0 has an ingress qdisc: it is wired.
func (b *boxNS) hasIngress(t *testing.T) bool {
	t.Helper()
	qs, err := b.h.QdiscList(b.link(t, "eth0"))
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(qs, func(q netlink.Qdisc) bool { return q.Type() == "ingress" })
}

// readNetState reads netns.json from dir.
func readNetState(t *testing.T, dir string) netState {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, netStateFile))
	if err != nil {
		t.Fatal(err)
	}
	var st netState
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// The namespace a spec names gets a tap per addressed interface with the
// interface's MAC; Start wires them and tells the guest the interface's
// configuration; the state file records what the delete action must undo;
// teardown undoes it and leaves the namespace and its interface as they
// were.
func TestBoxNetworkWiresTheSpecsNamespace(t *testing.T) {
	requireRoot(t)
	checkLeaks(t)
	b := newBoxNS(t)
	dir := t.TempDir()
	n, err := newBoxNetwork(netSpec(nil, netEntry(b.path)), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer n.teardown()
	if n.path != b.path {
		t.Errorf("path = %q, want %q", n.path, b.path)
	}
	nics := n.nics()
	if len(nics) != 1 || nics[0].Tap == nil || nics[0].MAC.String() != b.mac.String() {
		t.Fatalf("nics() = %+v; want one tap NIC with eth0's MAC %s", nics, b.mac)
	}
	if st := readNetState(t, dir); st.NetNS != b.path || len(st.Wired) != 0 {
		t.Errorf("state before Start = %+v", st)
	}

	req, err := n.wire(testCtx(t, testTimeout), "box1")
	if err != nil {
		t.Fatal(err)
	}
	mac := b.mac.String()
	want := &api.ConfigureNetworkRequest{
		Id: "box1",
		Interfaces: []*api.Interface{{
			DeviceMac: mac, Name: "eth0", Mac: mac, Mtu: 1500, Addresses: []string{"10.9.0.2/24", "fd00:9::2/64"},
		}},
		Routes: []*api.Route{
			{Dest: "10.10.0.0/16", Device: "eth0", Scope: 253},
			{Dest: "0.0.0.0/0", Gateway: "10.9.0.1", Device: "eth0"},
		},
		Neighbors: []*api.Neighbor{{Ip: "10.9.0.1", Mac: "02:00:00:00:00:01", Device: "eth0"}},
	}
	if req != nil {
		slices.Sort(req.Interfaces[0].Addresses)
	}
	if !proto.Equal(req, want) {
		t.Errorf("wire() =\n%v\nwant\n%v", req, want)
	}
	if !b.hasIngress(t) {
		t.Errorf("eth0 is not wired")
	}
	if st := readNetState(t, dir); st.NetNS != b.path || !slices.Equal(st.Wired, []string{"eth0"}) {
		t.Errorf("state after Start = %+v; want eth0 wired in %s", st, b.path)
	}

	if err := n.teardown(); err != nil {
		t.Errorf("teardown() = %v", err)
	}
	if b.hasIngress(t) {
		t.Errorf("eth0 is still wired after teardown")
	}
	poll.Until(t, "the tap goes with its descriptor", func() error {
		if taps := netnstest.LinkNames(t, b.h, network.TapPrefix); len(taps) > 0 {
			return fmt.Errorf("taps left: %v", taps)
		}
		return nil
	})
	if addrs, err := b.h.AddrList(b.link(t, "eth0"), netlink.FAMILY_V4); err != nil || len(addrs) != 1 {
		t.Errorf("eth0's addresses after teardown: %v, %v", addrs, err)
	}
}

// A shim killed after Start leaves eth0 wired; the delete action undoes it
// from the state file, and again is harmless.
func TestUnwireStaleUndoesAKilledShimsRedirects(t *testing.T) {
	requireRoot(t)
	checkLeaks(t)
	b := newBoxNS(t)
	dir := t.TempDir()
	n, err := newBoxNetwork(netSpec(nil, netEntry(b.path)), dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.wire(testCtx(t, testTimeout), "box1"); err != nil {
		n.teardown()
		t.Fatal(err)
	}
	n.close() // the shim dies: its descriptors close, nothing is unwired
	if !b.hasIngress(t) {
		t.Fatalf("eth0 is not wired")
	}
	for i := range 2 {
		if err := unwireStale(dir); err != nil {
			t.Errorf("unwireStale() #%d = %v", i, err)
		}
		if b.hasIngress(t) {
			t.Errorf("eth0 still wired after unwireStale() #%d", i)
		}
	}
}

// io.boxlite.network=none: QEMU in a new empty namespace, no NIC, nothing to
// wire at Start.
func TestNoNetworkHasNoNIC(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	n, err := newBoxNetwork(netSpec(map[string]string{AnnotationNetwork: "none"}, netEntry("")), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer n.teardown()
	if n.ns == nil || len(n.nics()) != 0 {
		t.Errorf("none: namespace %v, NICs %v; want a namespace and no NIC", n.ns, n.nics())
	}
	if cfg, err := n.wire(context.Background(), "box"); cfg != nil || err != nil {
		t.Errorf("wire() = %v, %v; want nothing to configure", cfg, err)
	}
}
