package network

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
)

// requireRoot skips the test unless it may create network namespaces,
// veths and taps.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run as root")
	}
}

// testNet is two namespaces joined by a veth: eth0 in a (the box's
// namespace, as a CNI plugin leaves it) and peer0 in b (the network
// beyond), both up.
type testNet struct {
	a, b   *os.File
	ha, hb *netlink.Handle
}

func newTestNet(t *testing.T) *testNet {
	t.Helper()
	requireRoot(t)
	n := &testNet{a: netnstest.New(t), b: netnstest.New(t)}
	n.ha, n.hb = netnstest.Handle(t, n.a), netnstest.Handle(t, n.b)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "eth0"},
		PeerName:      "peer0",
		PeerNamespace: netlink.NsFd(int(n.b.Fd())),
	}
	if err := n.ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth eth0/peer0: %v", err)
	}
	if err := n.ha.LinkSetUp(n.link(t, n.ha, "eth0")); err != nil {
		t.Fatal(err)
	}
	if err := n.hb.LinkSetUp(n.link(t, n.hb, "peer0")); err != nil {
		t.Fatal(err)
	}
	return n
}

// link returns the current state of the interface name seen through h.
func (n *testNet) link(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("interface %s: %v", name, err)
	}
	return l
}

// addLink adds an interface name to the namespace of n.ha that is none of
// eth0's business: a veth whose peer, "p" + name, is put in n.b and left
// down. The kernel has no dummy driver.
func (n *testNet) addLink(t *testing.T, name string, up bool) netlink.Link {
	t.Helper()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name},
		PeerName:      "p" + name,
		PeerNamespace: netlink.NsFd(int(n.b.Fd())),
	}
	if err := n.ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	l := n.link(t, n.ha, name)
	if up {
		if err := n.ha.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", name, err)
		}
	}
	return l
}

// addAddr adds the address cidr (without duplicate address detection, so
// an IPv6 one is usable at once) to l.
func addAddr(t *testing.T, h *netlink.Handle, l netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, l.Attrs().Name, err)
	}
}

// testTaps makes taps with CreateTaps. When the test ends their files are
// closed and the test fails unless the taps are gone from ns.
func testTaps(t *testing.T, ns *os.File, h *netlink.Handle, macs []net.HardwareAddr) []*Tap {
	t.Helper()
	taps, err := CreateTaps(ns, macs)
	if err != nil {
		t.Fatalf("CreateTaps: %v", err)
	}
	t.Cleanup(func() {
		for _, tap := range taps {
			tap.Close()
		}
		poll.Until(t, "taps gone once their files are closed", func() error {
			if names := netnstest.LinkNames(t, h, TapPrefix); len(names) > 0 {
				return fmt.Errorf("taps left: %v", names)
			}
			return nil
		})
	})
	return taps
}

func TestScanListsOnlyInterfacesWithAUsableAddress(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	tests := []struct {
		name   string
		setup  func(t *testing.T) netlink.Link
		listed bool
	}{
		{"loopback with addresses", func(t *testing.T) netlink.Link {
			lo := n.link(t, n.ha, "lo")
			if err := n.ha.LinkSetUp(lo); err != nil {
				t.Fatal(err)
			}
			return lo
		}, false},
		{"interface without address", func(t *testing.T) netlink.Link {
			return n.addLink(t, "bare0", false)
		}, false},
		{"interface with an IPv6 link-local address only", func(t *testing.T) netlink.Link {
			l := n.addLink(t, "ll0", true)
			addAddr(t, n.ha, l, "fe80::5/64")
			return l
		}, false},
		{"tap with an address", func(t *testing.T) netlink.Link {
			taps := testTaps(t, n.a, n.ha, []net.HardwareAddr{nil})
			l := n.link(t, n.ha, taps[0].Name)
			addAddr(t, n.ha, l, "10.99.0.1/24")
			return l
		}, false},
		{"interface with a global IPv6 address only", func(t *testing.T) netlink.Link {
			l := n.addLink(t, "v6only0", true)
			addAddr(t, n.ha, l, "fd00:1::1/64")
			return l
		}, true},
		{"veth with an IPv4 address", func(t *testing.T) netlink.Link {
			l := n.link(t, n.ha, "eth0")
			if err := n.ha.LinkSetMTU(l, 1400); err != nil {
				t.Fatal(err)
			}
			addAddr(t, n.ha, l, "10.77.0.2/24")
			return n.link(t, n.ha, "eth0")
		}, true},
	}
	var want []Link
	skipped := make(map[string]string) // interface name: case
	for _, tt := range tests {
		a := tt.setup(t).Attrs()
		if tt.listed {
			want = append(want, Link{Name: a.Name, Index: a.Index, MAC: a.HardwareAddr, MTU: a.MTU})
		} else {
			skipped[a.Name] = tt.name
		}
	}
	slices.SortFunc(want, func(x, y Link) int { return x.Index - y.Index })
	got, err := Scan(n.a)
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	for _, l := range got {
		if c, ok := skipped[l.Name]; ok {
			t.Errorf("Scan lists %s: %s", l.Name, c)
		}
	}
	if !equalLinks(got, want) {
		t.Errorf("Scan = %v, want %v", got, want)
	}
}

func TestScanFindsNothingBeforeTheInterfaceHasAnAddress(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	got, err := Scan(n.a)
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	if len(got) != 0 {
		t.Fatalf("Scan of a namespace whose eth0 has no address = %v, want none", got)
	}
	eth0 := n.link(t, n.ha, "eth0")
	addAddr(t, n.ha, eth0, "10.77.0.2/24")
	got, err = Scan(n.a)
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	a := eth0.Attrs()
	want := []Link{{Name: "eth0", Index: a.Index, MAC: a.HardwareAddr, MTU: a.MTU}}
	if !equalLinks(got, want) {
		t.Errorf("Scan = %v, want %v", got, want)
	}
	// The other namespace is untouched: peer0 has no address.
	if got, err := Scan(n.b); err != nil || len(got) != 0 {
		t.Errorf("Scan of the peer's namespace = %v, %v; want none", got, err)
	}
}

func equalLinks(a, b []Link) bool {
	return slices.EqualFunc(a, b, func(x, y Link) bool {
		return x.Name == y.Name && x.Index == y.Index && bytes.Equal(x.MAC, y.MAC) && x.MTU == y.MTU
	})
}

func TestCreateTapsMakesTapsThatLiveWhileTheirFileIsOpen(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	given, _ := net.ParseMAC("52:54:00:ab:cd:ef")
	taps := testTaps(t, n.a, n.ha, []net.HardwareAddr{nil, given})
	if len(taps) != 2 {
		t.Fatalf("CreateTaps made %d taps, want 2", len(taps))
	}
	if !isLocalUnicast(taps[0].MAC) {
		t.Errorf("tap for a nil MAC got %v, want a locally administered unicast MAC", taps[0].MAC)
	}
	if !bytes.Equal(taps[1].MAC, given) {
		t.Errorf("tap for %v got %v", given, taps[1].MAC)
	}
	for i, tap := range taps {
		if want := fmt.Sprintf("blxtap%d", i); tap.Name != want {
			t.Errorf("tap %d is named %q, want %q", i, tap.Name, want)
		}
		l := n.link(t, n.ha, tap.Name)
		tt, ok := l.(*netlink.Tuntap)
		if !ok {
			t.Fatalf("%s is a %s, want a tuntap", tap.Name, l.Type())
		}
		if tt.Mode != netlink.TUNTAP_MODE_TAP {
			t.Errorf("%s mode %v, want tap", tap.Name, tt.Mode)
		}
		if want := netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR; tt.Flags&want != want {
			t.Errorf("%s flags %#x, want NO_PI and VNET_HDR", tap.Name, tt.Flags)
		}
		if !tt.NonPersist {
			t.Errorf("%s is persistent: it would outlive its VMM", tap.Name)
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("%s is down", tap.Name)
		}
		if v := readSysctl(t, n.a, "net/ipv6/conf/"+tap.Name+"/disable_ipv6"); v != "1" {
			t.Errorf("%s disable_ipv6 = %q, want 1", tap.Name, v)
		}
		if _, err := n.hb.LinkByName(tap.Name); err == nil {
			t.Errorf("%s is in the other namespace too", tap.Name)
		}
	}
	// Closing one tap's file removes that tap only.
	taps[0].Close()
	poll.Until(t, "blxtap0 gone after its file is closed", func() error {
		if names := netnstest.LinkNames(t, n.ha, TapPrefix); !slices.Equal(names, []string{"blxtap1"}) {
			return fmt.Errorf("taps %v, want [blxtap1]", names)
		}
		return nil
	})
}

// TestCreateTapsComeAfterInterfacesAddedLater makes taps in an empty
// namespace and adds an interface afterwards, as nerdctl's createRuntime
// hook does: the interface has the lower index, so the first interface
// that is up in index order (nerdctl inspect's primary interface, whose
// address it shows) is the CNI one, not a tap. Verified two-sided: with
// taps made in place, blxtap0 came first.
func TestCreateTapsComeAfterInterfacesAddedLater(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	// The namespace is as CRI or nerdctl hand it over: no interface up.
	if err := n.ha.LinkSetDown(n.link(t, n.ha, "eth0")); err != nil {
		t.Fatal(err)
	}
	taps := testTaps(t, n.a, n.ha, []net.HardwareAddr{nil, nil})
	later := n.addLink(t, "cni0", true)
	links, err := n.ha.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(links, func(x, y netlink.Link) int { return x.Attrs().Index - y.Attrs().Index })
	var first string
	for _, l := range links {
		if a := l.Attrs(); a.Flags&net.FlagLoopback == 0 && a.Flags&net.FlagUp != 0 {
			first = a.Name
			break
		}
	}
	if first == "" || strings.HasPrefix(first, TapPrefix) {
		t.Errorf("first interface up in index order is %q, want a non-tap one", first)
	}
	for _, tap := range taps {
		if idx := n.link(t, n.ha, tap.Name).Attrs().Index; idx <= later.Attrs().Index {
			t.Errorf("%s has index %d, not above %d of cni0, added after it", tap.Name, idx, later.Attrs().Index)
		}
	}
}

func TestCreateTapsLeavesNoTapOnFailure(t *testing.T) {
	leakcheck.FDs(t)
	n := newTestNet(t)
	// blxtap1 is taken by an interface that is not a tap: the second tap
	// cannot be made.
	n.addLink(t, "blxtap1", false)
	taps, err := CreateTaps(n.a, []net.HardwareAddr{nil, nil})
	if err == nil {
		for _, tap := range taps {
			tap.Close()
		}
		t.Fatal("CreateTaps succeeded although blxtap1 is a veth")
	}
	if !strings.Contains(err.Error(), "blxtap1") {
		t.Errorf("CreateTaps = %q, which does not name the tap", err)
	}
	poll.Until(t, "blxtap0 removed after the failure", func() error {
		if names := netnstest.LinkNames(t, n.ha, TapPrefix); !slices.Equal(names, []string{"blxtap1"}) {
			return fmt.Errorf("interfaces %v, want only the veth blxtap1", names)
		}
		return nil
	})
}

func TestRandomMACIsALocallyAdministeredUnicastMAC(t *testing.T) {
	seen := make(map[string]bool)
	for range 64 {
		mac, err := RandomMAC()
		if err != nil {
			t.Fatal(err)
		}
		if len(mac) != 6 || !isLocalUnicast(mac) {
			t.Fatalf("RandomMAC = %v, want a locally administered unicast MAC", mac)
		}
		seen[mac.String()] = true
	}
	if len(seen) < 60 {
		t.Errorf("64 calls of RandomMAC gave %d distinct MACs", len(seen))
	}
}

func isLocalUnicast(mac net.HardwareAddr) bool {
	return len(mac) == 6 && mac[0]&1 == 0 && mac[0]&2 != 0
}

// readSysctl reads /proc/sys/<key> as the namespace ns has it.
func readSysctl(t *testing.T, ns *os.File, key string) string {
	t.Helper()
	var v []byte
	err := netns.Do(ns, func() error {
		var err error
		v, err = os.ReadFile("/proc/sys/" + key)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(v))
}
