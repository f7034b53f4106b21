package guest

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	bxnetns "github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
)

// Test NICs: the MACs a VMM would give two virtio-net devices.
const (
	nic0MAC = "52:54:00:12:34:56"
	nic1MAC = "52:54:00:12:34:57"
)

// requireNetAdmin skips the test unless it may create network namespaces.
func requireNetAdmin(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root (CAP_NET_ADMIN) to create network namespaces, veths and routes: run go test as root")
	}
}

// newTestNetns returns a new, empty network namespace that nothing else
// uses. It is created on a locked thread that is then returned to its own
// namespace (bxnetns.Do), so no thread stays in it. It is closed when
// the test ends, and must then be released (netnstest.Release).
func newTestNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	requireNetAdmin(t)
	var ns netns.NsHandle
	if err := bxnetns.Do(nil, func() error {
		var err error
		ns, err = netns.New()
		return err
	}); err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	netnstest.Release(t, int(ns), ns.Close)
	return ns
}

// testHandle returns a netlink handle in ns, closed when the test ends.
func testHandle(t *testing.T, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := newHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// addNIC stands in for a virtio NIC in ns: one end of a veth pair, name
// with MAC mac, whose peer stays in ns and is up (so the NIC has a carrier).
func addNIC(t *testing.T, ns netns.NsHandle, name, mac string) {
	t.Helper()
	h := testHandle(t, ns)
	hw, err := net.ParseMAC(mac)
	if err != nil {
		t.Fatal(err)
	}
	peer := "p" + name
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: hw}, PeerName: peer}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	p, err := h.LinkByName(peer)
	if err == nil {
		err = h.LinkSetUp(p)
	}
	if err != nil {
		t.Fatalf("set %s up: %v", peer, err)
	}
}

// configure validates req and applies it with root as the VM's namespace.
func configure(root, target netns.NsHandle, req *api.ConfigureNetworkRequest) error {
	plan, err := parseNetwork(req)
	if err != nil {
		return err
	}
	return configureLinks(root, target, plan)
}

// mustLink returns the link name in h's namespace.
func mustLink(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	link, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	return link
}

// addrs lists the addresses of link, sorted, but for IPv6 link-local ones,
// which the kernel adds on its own once the link has a carrier.
func addrs(t *testing.T, h *netlink.Handle, link netlink.Link) []string {
	t.Helper()
	list, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range list {
		if !a.IP.IsLinkLocalUnicast() {
			out = append(out, a.IPNet.String())
		}
	}
	slices.Sort(out)
	return out
}

// routes lists the main table's routes of h's namespace as
// "<dest> [via <gw>] [src <src>] dev <name> metric <n> scope <scope>",
// sorted, but for the IPv6 link-local ones the kernel adds with the carrier.
func routes(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	list, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range list {
		if r.Dst.IP.IsLinkLocalUnicast() {
			continue
		}
		link, err := h.LinkByIndex(r.LinkIndex)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%s dev %s metric %d scope %s", describeRoute(&r), link.Attrs().Name, r.Priority, r.Scope))
	}
	slices.Sort(out)
	return out
}

// isUp says whether link is administratively up.
func isUp(link netlink.Link) bool { return link.Attrs().Flags&net.FlagUp != 0 }

func TestConfigureNetworkMovesAndConfiguresInterface(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	req := &api.ConfigureNetworkRequest{Interfaces: []*api.Interface{{
		DeviceMac: nic0MAC, Name: "net0", Mac: "02:42:0a:04:00:02", Mtu: 1400,
		Addresses: []string{"10.4.0.2/24", "fd00::2/64"},
	}}}
	if err := configure(root, target, req); err != nil {
		t.Fatal(err)
	}
	th, rh := testHandle(t, target), testHandle(t, root)
	link := mustLink(t, th, "net0")
	a := link.Attrs()
	if a.HardwareAddr.String() != "02:42:0a:04:00:02" || a.MTU != 1400 || !isUp(link) {
		t.Fatalf("net0 has mac %s mtu %d flags %v; want 02:42:0a:04:00:02, 1400, up", a.HardwareAddr, a.MTU, a.Flags)
	}
	got := addrs(t, th, link)
	for _, want := range []string{"10.4.0.2/24", "fd00::2/64"} {
		if !slices.Contains(got, want) {
			t.Fatalf("net0 has addresses %v, want %s among them", got, want)
		}
	}
	v6, err := th.AddrList(link, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range v6 {
		if addr.IP.Equal(net.ParseIP("fd00::2")) && addr.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			t.Fatalf("fd00::2 is not usable at once: flags %#x", addr.Flags)
		}
	}
	if !isUp(mustLink(t, th, "lo")) {
		t.Fatal("lo is not up in the container's namespace")
	}
	if names := netnstest.LinkNames(t, th, ""); !slices.Equal(names, []string{"lo", "net0"}) {
		t.Fatalf("container's namespace has links %v", names)
	}
	if names := netnstest.LinkNames(t, rh, ""); !slices.Equal(names, []string{"lo", "peth0"}) {
		t.Fatalf("root namespace has links %v; the NIC should have left", names)
	}
}

func TestConfigureNetworkAddsLinkRoutesBeforeGatewayRoutes(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	req := &api.ConfigureNetworkRequest{
		// A /32: the gateway is reachable only through the link route, which
		// comes after the default route in the request.
		Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0", Addresses: []string{"10.4.0.2/32", "fd00::2/64"}}},
		Routes: []*api.Route{
			{Gateway: "10.4.0.1", Device: "eth0", Source: "10.4.0.2", Metric: 100},
			{Dest: "10.4.0.0/24", Device: "eth0"},
			{Gateway: "fd00::1", Device: "eth0"},
		},
	}
	if err := configure(root, target, req); err != nil {
		t.Fatal(err)
	}
	got := routes(t, testHandle(t, target))
	for _, want := range []string{
		"default via 10.4.0.1 src 10.4.0.2 dev eth0 metric 100 scope universe",
		"10.4.0.0/24 dev eth0 metric 0 scope link",
		"default via fd00::1 dev eth0 metric 1024 scope universe",
	} {
		if !slices.Contains(got, want) {
			t.Fatalf("routes %q lack %q", got, want)
		}
	}
}

func TestConfigureNetworkSetsPermanentNeighbors(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	req := &api.ConfigureNetworkRequest{
		Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0", Addresses: []string{"10.4.0.2/24", "fd00::2/64"}}},
		Neighbors: []*api.Neighbor{
			{Ip: "10.4.0.1", Mac: "02:00:00:00:00:01", Device: "eth0"},
			{Ip: "fd00::1", Mac: "02:00:00:00:00:01", Device: "eth0"},
		},
	}
	if err := configure(root, target, req); err != nil {
		t.Fatal(err)
	}
	th := testHandle(t, target)
	neighs, err := th.NeighList(mustLink(t, th, "eth0").Attrs().Index, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range []string{"10.4.0.1", "fd00::1"} {
		i := slices.IndexFunc(neighs, func(n netlink.Neigh) bool { return n.IP.Equal(net.ParseIP(ip)) })
		if i < 0 {
			t.Fatalf("no neighbour %s in %v", ip, neighs)
		}
		if n := neighs[i]; n.State != netlink.NUD_PERMANENT || n.HardwareAddr.String() != "02:00:00:00:00:01" {
			t.Fatalf("neighbour %s is %s in state %#x, want 02:00:00:00:00:01 permanent", ip, n.HardwareAddr, n.State)
		}
	}
}

func TestConfigureNetworkSwapsKernelNames(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	addNIC(t, root, "eth1", nic1MAC)
	req := &api.ConfigureNetworkRequest{Interfaces: []*api.Interface{
		{DeviceMac: nic0MAC, Name: "eth1", Addresses: []string{"10.4.0.2/24"}},
		{DeviceMac: nic1MAC, Name: "eth0", Addresses: []string{"10.5.0.2/24"}},
	}}
	if err := configure(root, target, req); err != nil {
		t.Fatal(err)
	}
	th := testHandle(t, target)
	for name, want := range map[string]struct{ mac, addr string }{
		"eth1": {nic0MAC, "10.4.0.2/24"},
		"eth0": {nic1MAC, "10.5.0.2/24"},
	} {
		link := mustLink(t, th, name)
		if link.Attrs().HardwareAddr.String() != want.mac || !isUp(link) || !slices.Contains(addrs(t, th, link), want.addr) {
			t.Fatalf("%s has mac %s, up %v, addresses %v; want %s, up, %s", name, link.Attrs().HardwareAddr, isUp(link), addrs(t, th, link), want.mac, want.addr)
		}
	}
}

// fullRequest exercises every part of a request on the NICs nic0MAC and
// nic1MAC.
func fullRequest() *api.ConfigureNetworkRequest {
	return &api.ConfigureNetworkRequest{
		Interfaces: []*api.Interface{
			{DeviceMac: nic0MAC, Name: "eth1", Mac: "02:42:0a:04:00:02", Mtu: 1450, Addresses: []string{"10.4.0.2/24", "fd00::2/64"}},
			{DeviceMac: nic1MAC, Name: "eth0", Addresses: []string{"10.5.0.2/24"}},
		},
		Routes: []*api.Route{
			{Gateway: "10.4.0.1", Device: "eth1"},
			// The same as the kernel's prefix route of 10.4.0.2/24.
			{Dest: "10.4.0.0/24", Device: "eth1"},
			{Dest: "192.168.0.0/16", Gateway: "10.5.0.1", Device: "eth0", Metric: 10},
			{Gateway: "fd00::1", Device: "eth1"},
		},
		Neighbors: []*api.Neighbor{{Ip: "10.4.0.1", Mac: "02:00:00:00:00:01", Device: "eth1"}},
	}
}

// netState describes the links, addresses, main routes and permanent
// neighbours of h's namespace.
func netState(t *testing.T, h *netlink.Handle) string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, l := range links {
		a := l.Attrs()
		fmt.Fprintf(&b, "%s %s mtu %d up %v %v\n", a.Name, a.HardwareAddr, a.MTU, isUp(l), addrs(t, h, l))
	}
	neighs, err := h.NeighList(0, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.State == netlink.NUD_PERMANENT {
			fmt.Fprintf(&b, "neigh %s %s %d\n", n.IP, n.HardwareAddr, n.LinkIndex)
		}
	}
	return b.String() + strings.Join(routes(t, h), "\n")
}

func TestConfigureNetworkRetryIsIdempotent(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	addNIC(t, root, "eth1", nic1MAC)
	if err := configure(root, target, fullRequest()); err != nil {
		t.Fatal(err)
	}
	th := testHandle(t, target)
	before := netState(t, th)
	if err := configure(root, target, fullRequest()); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if after := netState(t, th); after != before {
		t.Fatalf("retry changed the namespace:\n%s\nbecame\n%s", before, after)
	}
}

func TestConfigureNetworkFinishesAnInterruptedRequest(t *testing.T) {
	// Where an earlier request may have stopped with nic0 half done.
	tests := []struct {
		name      string
		interrupt func(t *testing.T, rh, th *netlink.Handle, target netns.NsHandle)
	}{
		{"renamed in the root namespace", func(t *testing.T, rh, _ *netlink.Handle, _ netns.NsHandle) {
			if err := rh.LinkSetName(mustLink(t, rh, "eth0"), tempLinkName(mac(t, nic0MAC))); err != nil {
				t.Fatal(err)
			}
		}},
		{"moved under its temporary name", func(t *testing.T, rh, _ *netlink.Handle, target netns.NsHandle) {
			link := mustLink(t, rh, "eth0")
			if err := rh.LinkSetName(link, tempLinkName(mac(t, nic0MAC))); err != nil {
				t.Fatal(err)
			}
			if err := rh.LinkSetNsFd(link, int(target)); err != nil {
				t.Fatal(err)
			}
		}},
		{"renamed in the container's namespace", func(t *testing.T, rh, th *netlink.Handle, target netns.NsHandle) {
			if err := rh.LinkSetNsFd(mustLink(t, rh, "eth0"), int(target)); err != nil {
				t.Fatal(err)
			}
			if err := th.LinkSetName(mustLink(t, th, "eth0"), "eth1"); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			want := func() string {
				root, target := newTestNetns(t), newTestNetns(t)
				addNIC(t, root, "eth0", nic0MAC)
				addNIC(t, root, "eth1", nic1MAC)
				if err := configure(root, target, fullRequest()); err != nil {
					t.Fatal(err)
				}
				return netState(t, testHandle(t, target))
			}()
			root, target := newTestNetns(t), newTestNetns(t)
			addNIC(t, root, "eth0", nic0MAC)
			addNIC(t, root, "eth1", nic1MAC)
			th := testHandle(t, target)
			tt.interrupt(t, testHandle(t, root), th, target)
			if err := configure(root, target, fullRequest()); err != nil {
				t.Fatal(err)
			}
			if got := netState(t, th); got != want {
				t.Fatalf("after an interruption the namespace is\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// mac parses a MAC address.
func mac(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	hw, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return hw
}

func TestConfigureNetworkUnknownMACIsNotFound(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	req := &api.ConfigureNetworkRequest{Interfaces: []*api.Interface{{DeviceMac: "52:54:00:99:99:99", Name: "eth0"}}}
	err := configure(root, target, req)
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "52:54:00:99:99:99") {
		t.Fatalf("err = %v, want NotFound naming the MAC", err)
	}
	if names := netnstest.LinkNames(t, testHandle(t, root), ""); !slices.Equal(names, []string{"eth0", "lo", "peth0"}) {
		t.Fatalf("root namespace has links %v", names)
	}
}

func TestConfigureNetworkRejectsAConflictingRoute(t *testing.T) {
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	req := &api.ConfigureNetworkRequest{
		Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0", Addresses: []string{"10.4.0.2/24"}}},
		Routes:     []*api.Route{{Gateway: "10.4.0.1", Device: "eth0"}},
	}
	if err := configure(root, target, req); err != nil {
		t.Fatal(err)
	}
	req.Routes[0].Gateway = "10.4.0.254"
	err := configure(root, target, req)
	if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "routes[0]") {
		t.Fatalf("err = %v, want AlreadyExists naming routes[0]", err)
	}
}
