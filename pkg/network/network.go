// Package network wires a box's network namespace to its VM, the
// tc-redirect way of Kata Containers and firecracker-containerd.
//
// QEMU runs inside the box's network namespace. For each interface there
// that carries an address (a CNI veth, or whatever a plugin made), the VM
// gets a tap in the same namespace; ingress qdiscs and two u32 filters with
// mirred egress redirect move every frame from the interface to the tap and
// back, so the guest's NIC, which gets the interface's MAC, is on the
// interface's network. The interface keeps its addresses (CRI reads the
// pod IP from it) but its own stack no longer receives anything.
//
// A microvm cannot hot-plug a NIC, and some front doors configure the
// namespace only after the task is created (ctr --cni, nerdctl's
// createRuntime hook): taps are made when the VM boots (CreateTaps) and
// wired when the box starts (Wire). Taps get interface indexes above any
// the kernel hands out, so they come after the CNI interfaces, as when the
// taps are made after CNI ran (Kata). Taps are not persistent: each lives
// while QEMU holds its descriptor, so a dead VMM never leaves one behind.
package network

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/netns"
)

// TapPrefix starts the name of every tap this package makes.
const TapPrefix = "blxtap"

// Link is an interface of the namespace that carries an address.
type Link struct {
	// Name, Index, MAC and MTU are the interface's.
	Name  string
	Index int
	MAC   net.HardwareAddr
	MTU   int
}

// Tap is a tap device made for a VM NIC.
type Tap struct {
	// Name is the tap's name in the namespace.
	Name string
	// File is the tap's descriptor, to hand to QEMU; closing every copy
	// removes the tap.
	File *os.File
	// MAC is the address the VM's NIC gets at boot: the interface's when
	// it was known then, else a random locally administered one.
	MAC net.HardwareAddr
}

// Close closes the shim's descriptor of the tap.
func (t *Tap) Close() error { return t.File.Close() }

// Scan returns the interfaces of the namespace ns that carry an address
// other than an IPv6 link-local one, in index order: loopback and taps are
// never among them.
func Scan(ns *os.File) ([]Link, error) {
	h, err := netns.Handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return scan(h)
}

func scan(h *netlink.Handle) ([]Link, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []Link
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || strings.HasPrefix(a.Name, TapPrefix) {
			continue
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", a.Name, err)
		}
		if len(usableAddrs(addrs)) == 0 {
			continue
		}
		out = append(out, Link{Name: a.Name, Index: a.Index, MAC: a.HardwareAddr, MTU: a.MTU})
	}
	return out, nil
}

// usableAddrs drops IPv6 link-local addresses: the guest derives its own
// from the same MAC.
func usableAddrs(addrs []netlink.Addr) []netlink.Addr {
	var out []netlink.Addr
	for _, a := range addrs {
		if a.IP.To4() == nil && a.IP.IsLinkLocalUnicast() {
			continue
		}
		out = append(out, a)
	}
	return out
}

// tapIndexBase is the interface index of the first tap: far above the
// indexes the kernel hands out in order, so every interface a CNI plugin
// adds to the namespace after the VM booted (nerdctl's createRuntime hook,
// ctr --cni) still comes before the taps. Tools that take the first
// interface that is up as the container's own, in index order, then find
// the CNI interface, as under runc (nerdctl inspect's IPAddress does).
const tapIndexBase = 1 << 20

// CreateTaps makes one tap per MAC in the namespace ns, named TapPrefix0,
// TapPrefix1, ... with interface indexes tapIndexBase, tapIndexBase+1, ...;
// a nil MAC gets a random one. Each tap is made in a scratch namespace and
// moved into ns with its index, since TUNSETIFF cannot choose one. On
// failure none is left.
func CreateTaps(ns *os.File, macs []net.HardwareAddr) ([]*Tap, error) {
	scratch, err := netns.New()
	if err != nil {
		return nil, err
	}
	defer scratch.Close()
	var taps []*Tap
	err = netns.Do(scratch, func() error {
		for i, mac := range macs {
			if mac == nil {
				var err error
				if mac, err = RandomMAC(); err != nil {
					return err
				}
			}
			name := fmt.Sprintf("%s%d", TapPrefix, i)
			f, err := openTap(name)
			if err != nil {
				return err
			}
			taps = append(taps, &Tap{Name: name, File: f, MAC: mac})
			if err := moveLink(name, ns, tapIndexBase+i); err != nil {
				return fmt.Errorf("move tap %s into %s: %w", name, ns.Name(), err)
			}
		}
		return nil
	})
	if err == nil {
		err = netns.Do(ns, func() error {
			for _, t := range taps {
				if err := prepareTap(t.Name); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err != nil {
		for _, t := range taps {
			t.Close()
		}
		return nil, err
	}
	return taps, nil
}

// moveLink moves the interface name from the calling thread's namespace
// into ns, where it gets the interface index index (IFLA_NEW_IFINDEX,
// Linux 4.16).
func moveLink(name string, ns *os.File, index int) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(l.Attrs().Index)
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(ns.Fd()))))
	req.AddData(nl.NewRtAttr(unix.IFLA_NEW_IFINDEX, nl.Uint32Attr(uint32(index))))
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("RTM_NEWLINK: %w", err)
	}
	return nil
}

// openTap creates a non-persistent tap in the calling thread's namespace.
func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("create tap %s: %w", name, os.NewSyscallError("TUNSETIFF", err))
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// prepareTap turns IPv6 off on the tap (it must not send router
// solicitations or DAD probes of its own into the guest's link) and sets
// it up.
func prepareTap(name string) error {
	// Absent when the namespace has no IPv6: nothing to turn off then.
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0)
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("tap %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set tap %s up: %w", name, err)
	}
	return nil
}

// RandomMAC returns a random locally administered unicast MAC.
func RandomMAC() (net.HardwareAddr, error) {
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		return nil, err
	}
	mac[0] = mac[0]&^1 | 2
	return mac, nil
}
