package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/netns"
)

// Config is what the guest must configure for the interfaces it took over.
type Config struct {
	Interfaces []Interface
	// Routes through the interfaces, link-scope routes first.
	Routes []Route
	// Neighbors are the interfaces' permanent neighbour entries.
	Neighbors []Neighbor
}

// Interface is one interface as the guest must configure it.
type Interface struct {
	// DeviceMAC is the MAC the NIC got at boot (how the guest finds it).
	DeviceMAC net.HardwareAddr
	// Name, MAC and MTU are the namespace interface's.
	Name string
	MAC  net.HardwareAddr
	MTU  int
	// Addrs are its addresses (IPv6 link-local ones left out).
	Addrs []*net.IPNet
}

// Route is a route of the namespace through one of the interfaces.
type Route struct {
	// Dst is 0.0.0.0/0 or ::/0 for a default route (as netlink reports
	// it), never nil: it carries the route's family.
	Dst *net.IPNet
	// Gw is nil for a route straight onto the link.
	Gw     net.IP
	Src    net.IP
	Dev    string
	Metric int
	Scope  netlink.Scope
}

// Neighbor is a permanent neighbour entry.
type Neighbor struct {
	IP  net.IP
	MAC net.HardwareAddr
	Dev string
}

// Pair is an interface and the tap its traffic goes to.
type Pair struct {
	Link Link
	Tap  *Tap
}

// Wire redirects every frame between each pair's interface and tap (both
// ways), gives the tap the interface's MTU, and returns what the guest must
// configure. It is idempotent: a second call replaces the filters. On
// failure the redirects it made are removed.
func Wire(ns *os.File, pairs []Pair) (*Config, error) {
	h, err := netns.Handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	cfg := &Config{}
	// Both ends of each pair: the tap's ingress redirects too.
	var wired []string
	for _, p := range pairs {
		wired = append(wired, p.Link.Name, p.Tap.Name)
		if err := wirePair(h, p); err != nil {
			unwire(h, wired)
			return nil, err
		}
		if err := cfg.add(h, p); err != nil {
			unwire(h, wired)
			return nil, err
		}
	}
	// Link-scope routes first: a gateway must be reachable when its route
	// is added.
	slices.SortStableFunc(cfg.Routes, func(a, b Route) int {
		return boolInt(a.Gw != nil) - boolInt(b.Gw != nil)
	})
	return cfg, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// wirePair sets up the redirects between one interface and its tap.
func wirePair(h *netlink.Handle, p Pair) error {
	tap, err := h.LinkByName(p.Tap.Name)
	if err != nil {
		return fmt.Errorf("tap %s: %w", p.Tap.Name, err)
	}
	link, err := h.LinkByIndex(p.Link.Index)
	if err != nil {
		return fmt.Errorf("interface %s: %w", p.Link.Name, err)
	}
	if err := h.LinkSetMTU(tap, p.Link.MTU); err != nil {
		return fmt.Errorf("set MTU of %s to %d: %w", p.Tap.Name, p.Link.MTU, err)
	}
	for _, dir := range [][2]netlink.Link{{link, tap}, {tap, link}} {
		if err := redirect(h, dir[0], dir[1]); err != nil {
			return fmt.Errorf("redirect %s to %s: %w", dir[0].Attrs().Name, dir[1].Attrs().Name, err)
		}
	}
	return nil
}

// redirect replaces from's ingress qdisc by one whose only filter sends
// every frame out of to.
func redirect(h *netlink.Handle, from, to netlink.Link) error {
	q := ingress(from.Attrs().Index)
	if err := h.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove old ingress qdisc: %w", err)
	}
	if err := h.QdiscAdd(q); err != nil {
		return fmt.Errorf("add ingress qdisc: %w", err)
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index,
			Parent:    netlink.MakeHandle(0xffff, 0),
			Priority:  1,
			Protocol:  unix.ETH_P_ALL,
		},
		// No selector: u32 matches every frame.
		Actions: []netlink.Action{netlink.NewMirredAction(to.Attrs().Index)},
	}
	if err := h.FilterAdd(f); err != nil {
		return fmt.Errorf("add mirred filter: %w", err)
	}
	return nil
}

func ingress(index int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: index,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_INGRESS,
	}}
}

// Unwire removes the ingress qdiscs (and with them the redirects) of the
// named interfaces of ns. Interfaces that are gone (a CNI plugin deleted
// them, or the namespace went) are not an error; taps go with their VMM.
func Unwire(ns *os.File, names []string) error {
	h, err := netns.Handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	return unwire(h, names)
}

func unwire(h *netlink.Handle, names []string) error {
	var errs []error
	for _, name := range names {
		l, err := h.LinkByName(name)
		if err != nil {
			continue
		}
		if err := h.QdiscDel(ingress(l.Attrs().Index)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("remove ingress qdisc of %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// add reads one interface's addresses, routes and permanent neighbours.
func (c *Config) add(h *netlink.Handle, p Pair) error {
	link, err := h.LinkByIndex(p.Link.Index)
	if err != nil {
		return fmt.Errorf("interface %s: %w", p.Link.Name, err)
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", p.Link.Name, err)
	}
	iface := Interface{DeviceMAC: p.Tap.MAC, Name: p.Link.Name, MAC: p.Link.MAC, MTU: p.Link.MTU}
	for _, a := range usableAddrs(addrs) {
		iface.Addrs = append(iface.Addrs, a.IPNet)
	}
	c.Interfaces = append(c.Interfaces, iface)
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: p.Link.Index, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("routes of %s: %w", p.Link.Name, err)
	}
	for _, r := range routes {
		// The kernel makes the prefix routes of an address by itself, in
		// the guest as here.
		if r.Protocol == unix.RTPROT_KERNEL || len(r.MultiPath) > 0 {
			continue
		}
		c.Routes = append(c.Routes, Route{Dst: r.Dst, Gw: r.Gw, Src: r.Src, Dev: p.Link.Name, Metric: r.Priority, Scope: r.Scope})
	}
	neighs, err := h.NeighList(p.Link.Index, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("neighbours of %s: %w", p.Link.Name, err)
	}
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT != 0 && n.HardwareAddr != nil {
			c.Neighbors = append(c.Neighbors, Neighbor{IP: n.IP, MAC: n.HardwareAddr, Dev: p.Link.Name})
		}
	}
	return nil
}
