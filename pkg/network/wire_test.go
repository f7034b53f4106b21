package network

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/netns"
)

// vnetHdrLen is the size of the virtio_net_hdr before every frame of a tap
// made with IFF_VNET_HDR.
const vnetHdrLen = 10

// testTimeout bounds the wait for frames to come out of a tap.
const testTimeout = 10 * time.Second

// wiredNet is a testNet whose eth0 (10.77.0.2/24 in a; peer0 is
// 10.77.0.1/24 in b) is wired to a tap.
type wiredNet struct {
	*testNet
	eth0 Link
	tap  *Tap
	cfg  *Config
}

// newWiredNet builds a testNet, gives eth0 and peer0 their addresses, lets
// setup add more to the box's namespace, then scans it, makes a tap with a
// random MAC and wires eth0 to it.
func newWiredNet(t *testing.T, setup func(n *testNet)) *wiredNet {
	t.Helper()
	n := newTestNet(t)
	addAddr(t, n.ha, n.link(t, n.ha, "eth0"), "10.77.0.2/24")
	addAddr(t, n.hb, n.link(t, n.hb, "peer0"), "10.77.0.1/24")
	if setup != nil {
		setup(n)
	}
	w := &wiredNet{testNet: n, eth0: scanOne(t, n.a, "eth0")}
	w.tap = testTaps(t, n.a, n.ha, []net.HardwareAddr{nil})[0]
	cfg, err := Wire(n.a, []Pair{{Link: w.eth0, Tap: w.tap}})
	if err != nil {
		t.Fatalf("Wire: %v", err)
	}
	w.cfg = cfg
	return w
}

// scanOne returns the interface name as Scan lists it.
func scanOne(t *testing.T, ns *os.File, name string) Link {
	t.Helper()
	links, err := Scan(ns)
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	i := slices.IndexFunc(links, func(l Link) bool { return l.Name == name })
	if i < 0 {
		t.Fatalf("Scan = %v, which lacks %s", links, name)
	}
	return links[i]
}

// redirects returns, for the link name seen through h, whether it has an
// ingress qdisc and the interface indexes its u32 filters redirect to.
func redirects(t *testing.T, h *netlink.Handle, name string) (bool, []int) {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("interface %s: %v", name, err)
	}
	qdiscs, err := h.QdiscList(l)
	if err != nil {
		t.Fatalf("qdiscs of %s: %v", name, err)
	}
	if !slices.ContainsFunc(qdiscs, func(q netlink.Qdisc) bool { return q.Type() == "ingress" }) {
		return false, nil
	}
	filters, err := h.FilterList(l, netlink.MakeHandle(0xffff, 0))
	if err != nil {
		t.Fatalf("ingress filters of %s: %v", name, err)
	}
	var to []int
	for _, f := range filters {
		u, ok := f.(*netlink.U32)
		if !ok {
			t.Errorf("%s has a %s ingress filter, want u32 only", name, f.Type())
			continue
		}
		for _, a := range u.Actions {
			if m, ok := a.(*netlink.MirredAction); ok {
				if m.MirredAction != netlink.TCA_EGRESS_REDIR {
					t.Errorf("%s redirects with mirred action %v, want egress redirect", name, m.MirredAction)
				}
				to = append(to, m.Ifindex)
			}
		}
	}
	return true, to
}

// checkRedirect fails the test unless from's ingress sends every frame to
// to, with exactly one filter.
func checkRedirect(t *testing.T, h *netlink.Handle, from, to string) {
	t.Helper()
	toLink, err := h.LinkByName(to)
	if err != nil {
		t.Fatalf("interface %s: %v", to, err)
	}
	ok, got := redirects(t, h, from)
	if !ok {
		t.Fatalf("%s has no ingress qdisc", from)
	}
	if want := []int{toLink.Attrs().Index}; !slices.Equal(got, want) {
		t.Errorf("%s redirects to interfaces %v, want %v (%s) once", from, got, want, to)
	}
}

// checkNoRedirect fails the test if name has an ingress qdisc.
func checkNoRedirect(t *testing.T, h *netlink.Handle, name string) {
	t.Helper()
	if ok, to := redirects(t, h, name); ok {
		t.Errorf("%s still has an ingress qdisc (redirecting to %v)", name, to)
	}
}

func TestWireReturnsTheConfigurationOfTheInterface(t *testing.T) {
	leakcheck.FDs(t)
	var eth0Attrs *netlink.LinkAttrs
	w := newWiredNet(t, func(n *testNet) {
		h := n.ha
		eth0 := n.link(t, h, "eth0")
		if err := h.LinkSetMTU(eth0, 1400); err != nil {
			t.Fatal(err)
		}
		addAddr(t, h, eth0, "fd00::2/64")
		_, static, _ := net.ParseCIDR("192.168.50.0/24")
		routes := []*netlink.Route{
			{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("10.77.0.1")},
			{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("fd00::1")},
			{LinkIndex: eth0.Attrs().Index, Dst: static, Scope: netlink.SCOPE_LINK},
		}
		// Another interface's address, route and neighbour are not eth0's.
		other := n.addLink(t, "other0", true)
		addAddr(t, h, other, "10.88.0.1/24")
		_, otherNet, _ := net.ParseCIDR("192.168.60.0/24")
		routes = append(routes, &netlink.Route{LinkIndex: other.Attrs().Index, Dst: otherNet, Scope: netlink.SCOPE_LINK})
		for _, r := range routes {
			if err := h.RouteAdd(r); err != nil {
				t.Fatalf("add route %v: %v", r, err)
			}
		}
		for _, nb := range []struct {
			link  netlink.Link
			ip    string
			mac   string
			state int
		}{
			{eth0, "10.77.0.9", "02:00:00:00:00:09", netlink.NUD_PERMANENT},
			{eth0, "10.77.0.10", "02:00:00:00:00:0a", netlink.NUD_STALE},
			{eth0, "10.77.0.11", "02:00:00:00:00:0b", netlink.NUD_REACHABLE},
			{other, "10.88.0.9", "02:00:00:00:00:0c", netlink.NUD_PERMANENT},
		} {
			mac, _ := net.ParseMAC(nb.mac)
			err := h.NeighAdd(&netlink.Neigh{LinkIndex: nb.link.Attrs().Index, Family: netlink.FAMILY_V4,
				State: nb.state, IP: net.ParseIP(nb.ip), HardwareAddr: mac})
			if err != nil {
				t.Fatalf("add neighbour %s: %v", nb.ip, err)
			}
		}
		eth0Attrs = n.link(t, h, "eth0").Attrs()
	})
	cfg := w.cfg

	if len(cfg.Interfaces) != 1 {
		t.Fatalf("Wire returned interfaces %+v, want eth0 only", cfg.Interfaces)
	}
	iface := cfg.Interfaces[0]
	if iface.Name != "eth0" || !bytes.Equal(iface.MAC, eth0Attrs.HardwareAddr) || iface.MTU != 1400 {
		t.Errorf("interface %s %v MTU %d, want eth0 %v MTU 1400", iface.Name, iface.MAC, iface.MTU, eth0Attrs.HardwareAddr)
	}
	if !bytes.Equal(iface.DeviceMAC, w.tap.MAC) {
		t.Errorf("interface device MAC %v, want the tap's %v", iface.DeviceMAC, w.tap.MAC)
	}
	var addrs []string
	for _, a := range iface.Addrs {
		addrs = append(addrs, a.String())
	}
	slices.Sort(addrs)
	if want := []string{"10.77.0.2/24", "fd00::2/64"}; !slices.Equal(addrs, want) {
		t.Errorf("addresses %v, want %v (no link-local one)", addrs, want)
	}

	// Link-scope first, kernel prefix routes left out, another
	// interface's route left out.
	want := []string{
		"192.168.50.0/24 via <nil> dev eth0 scope link",
		"0.0.0.0/0 via 10.77.0.1 dev eth0 scope universe",
		"::/0 via fd00::1 dev eth0 scope universe",
	}
	var got []string
	for _, r := range cfg.Routes {
		got = append(got, fmt.Sprintf("%v via %v dev %s scope %v", r.Dst, r.Gw, r.Dev, r.Scope))
	}
	if !slices.Equal(got, want) {
		t.Errorf("routes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	if len(cfg.Neighbors) != 1 {
		t.Fatalf("neighbours %+v, want the permanent one only", cfg.Neighbors)
	}
	nb := cfg.Neighbors[0]
	if !nb.IP.Equal(net.ParseIP("10.77.0.9")) || nb.MAC.String() != "02:00:00:00:00:09" || nb.Dev != "eth0" {
		t.Errorf("neighbour %v %v dev %s, want 10.77.0.9 02:00:00:00:00:09 dev eth0", nb.IP, nb.MAC, nb.Dev)
	}

	if mtu := w.link(t, w.ha, w.tap.Name).Attrs().MTU; mtu != 1400 {
		t.Errorf("tap MTU %d, want eth0's 1400", mtu)
	}
	checkRedirect(t, w.ha, "eth0", w.tap.Name)
	checkRedirect(t, w.ha, w.tap.Name, "eth0")
	checkNoRedirect(t, w.ha, "other0")
}

// TestWireRedirectsFramesBothWays stands in for the guest on the tap: the
// peer's ARP request for eth0's address must come out of the tap, and an ARP
// reply written into the tap must reach the peer through eth0.
func TestWireRedirectsFramesBothWays(t *testing.T) {
	leakcheck.FDs(t)
	w := newWiredNet(t, nil)
	peer0 := w.link(t, w.hb, "peer0").Attrs().HardwareAddr
	eth0IP, peerIP := net.ParseIP("10.77.0.2").To4(), net.ParseIP("10.77.0.1").To4()
	payload := []byte("boxlite redirect test")

	// The peer sends a datagram to eth0's address, which makes it ARP
	// for it first.
	err := netns.Do(w.b, func() error {
		c, err := net.Dial("udp4", "10.77.0.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(payload)
		return err
	})
	if err != nil {
		t.Fatalf("send from the peer: %v", err)
	}

	// eth0 ingress → tap.
	deadline := time.Now().Add(testTimeout)
	readUntil(t, w.tap, deadline, "the peer's ARP request for 10.77.0.2", func(f []byte) bool {
		arp, ok := parseARP(f)
		return ok && arp.op == 1 && bytes.Equal(arp.sha, peer0) && arp.spa.Equal(peerIP) && arp.tpa.Equal(eth0IP)
	})
	// eth0's own stack did not see the request: it learnt no neighbour.
	if neighs, err := w.ha.NeighList(w.eth0.Index, netlink.FAMILY_V4); err != nil {
		t.Fatal(err)
	} else if len(neighs) > 0 {
		t.Errorf("eth0's stack received the request: neighbours %v", neighs)
	}

	// tap → eth0 egress: the peer learns eth0's MAC from the reply.
	reply := arpFrame(2, w.eth0.MAC, eth0IP, peer0, peerIP)
	if n, err := unix.Write(int(w.tap.File.Fd()), append(make([]byte, vnetHdrLen), reply...)); err != nil || n != vnetHdrLen+len(reply) {
		t.Fatalf("write the reply into the tap: %d, %v", n, err)
	}
	poll.Until(t, "the peer learns 10.77.0.2 from the reply written into the tap", func() error {
		neighs, err := w.hb.NeighList(0, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, nb := range neighs {
			if nb.IP.Equal(eth0IP) && bytes.Equal(nb.HardwareAddr, w.eth0.MAC) {
				return nil
			}
		}
		return fmt.Errorf("peer neighbours %v", neighs)
	})
	// Resolved, the peer sends the datagram it queued: it reaches the tap.
	readUntil(t, w.tap, deadline, "the peer's datagram", func(f []byte) bool {
		return len(f) >= 14 && bytes.Equal(f[:6], w.eth0.MAC) && bytes.HasSuffix(f, payload)
	})
}

// readUntil reads frames (without their virtio_net_hdr) from the tap until
// match accepts one, failing the test at deadline.
func readUntil(t *testing.T, tap *Tap, deadline time.Time, what string, match func([]byte) bool) {
	t.Helper()
	fd := int(tap.File.Fd())
	buf := make([]byte, vnetHdrLen+65536)
	var seen int
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("%s did not come out of the tap within %v (%d other frames)", what, testTimeout, seen)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(left/time.Millisecond)+1)
		if errors.Is(err, unix.EINTR) || n == 0 {
			continue
		}
		if err != nil {
			t.Fatalf("poll the tap: %v", err)
		}
		if n, err = unix.Read(fd, buf); err != nil {
			t.Fatalf("read the tap: %v", err)
		}
		if n < vnetHdrLen {
			t.Fatalf("read %d bytes from the tap, shorter than its virtio_net_hdr", n)
		}
		if match(buf[vnetHdrLen:n]) {
			return
		}
		seen++
	}
}

// arp is an Ethernet/IPv4 ARP packet.
type arp struct {
	op       uint16
	sha, tha net.HardwareAddr
	spa, tpa net.IP
}

// parseARP parses an Ethernet frame carrying an ARP packet.
func parseARP(f []byte) (arp, bool) {
	if len(f) < 14+28 || binary.BigEndian.Uint16(f[12:14]) != unix.ETH_P_ARP {
		return arp{}, false
	}
	p := f[14:]
	return arp{
		op:  binary.BigEndian.Uint16(p[6:8]),
		sha: net.HardwareAddr(p[8:14]),
		spa: net.IP(p[14:18]),
		tha: net.HardwareAddr(p[18:24]),
		tpa: net.IP(p[24:28]),
	}, true
}

// arpFrame builds an Ethernet frame from sha to tha carrying an ARP packet.
func arpFrame(op uint16, sha net.HardwareAddr, spa net.IP, tha net.HardwareAddr, tpa net.IP) []byte {
	f := slices.Concat([]byte(tha), []byte(sha), []byte{0x08, 0x06})
	f = append(f, 0, 1, 0x08, 0x00, 6, 4)
	f = binary.BigEndian.AppendUint16(f, op)
	return slices.Concat(f, []byte(sha), []byte(spa.To4()), []byte(tha), []byte(tpa.To4()))
}

func TestWireTwiceKeepsOneRedirectPerDirection(t *testing.T) {
	leakcheck.FDs(t)
	w := newWiredNet(t, nil)
	cfg, err := Wire(w.a, []Pair{{Link: w.eth0, Tap: w.tap}})
	if err != nil {
		t.Fatalf("second Wire: %v", err)
	}
	if fmt.Sprint(cfg) != fmt.Sprint(w.cfg) {
		t.Errorf("second Wire returned %+v, the first %+v", cfg, w.cfg)
	}
	checkRedirect(t, w.ha, "eth0", w.tap.Name)
	checkRedirect(t, w.ha, w.tap.Name, "eth0")
}

func TestUnwireRemovesTheRedirectsOfTheNamedInterfaces(t *testing.T) {
	leakcheck.FDs(t)
	w := newWiredNet(t, nil)
	if err := Unwire(w.a, []string{"eth0"}); err != nil {
		t.Fatalf("Unwire: %v", err)
	}
	checkNoRedirect(t, w.ha, "eth0")
	// eth0 receives for itself again: the peer's ARP request gets an answer.
	err := netns.Do(w.b, func() error {
		c, err := net.Dial("udp4", "10.77.0.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("x"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the peer resolves 10.77.0.2 through the unwired eth0", func() error {
		neighs, err := w.hb.NeighList(0, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, nb := range neighs {
			if nb.IP.Equal(net.ParseIP("10.77.0.2")) && bytes.Equal(nb.HardwareAddr, w.eth0.MAC) {
				return nil
			}
		}
		return fmt.Errorf("peer neighbours %v", neighs)
	})
}

func TestUnwireOfWhatIsNotWiredIsNotAnError(t *testing.T) {
	leakcheck.FDs(t)
	w := newWiredNet(t, nil)
	if err := Unwire(w.a, []string{"eth0"}); err != nil {
		t.Fatalf("Unwire: %v", err)
	}
	tests := []struct {
		name  string
		names []string
	}{
		{"missing interface", []string{"nosuch0"}},
		{"already unwired", []string{"eth0"}},
		{"never wired", []string{"lo"}},
		{"nothing", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := Unwire(w.a, tt.names); err != nil {
				t.Errorf("Unwire(%q) = %v, want nil", tt.names, err)
			}
			checkNoRedirect(t, w.ha, "eth0")
		})
	}
}

// TestWireFailureLeavesNoRedirect wires two interfaces, the second to a tap
// that does not exist: the first pair's redirects, both ways, must be gone.
func TestWireFailureLeavesNoRedirect(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	addAddr(t, n.ha, n.link(t, n.ha, "eth0"), "10.77.0.2/24")
	addAddr(t, n.ha, n.addLink(t, "eth1", true), "10.78.0.2/24")
	eth0, eth1 := scanOne(t, n.a, "eth0"), scanOne(t, n.a, "eth1")
	tap := testTaps(t, n.a, n.ha, []net.HardwareAddr{nil})[0]
	missing := &Tap{Name: TapPrefix + "9"}
	_, err := Wire(n.a, []Pair{{Link: eth0, Tap: tap}, {Link: eth1, Tap: missing}})
	if err == nil {
		t.Fatal("Wire to a missing tap succeeded")
	}
	if !strings.Contains(err.Error(), missing.Name) {
		t.Errorf("Wire = %q, which does not name the missing tap", err)
	}
	for _, name := range []string{"eth0", tap.Name, "eth1"} {
		checkNoRedirect(t, n.ha, name)
	}
}
