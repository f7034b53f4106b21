package guest

import (
	"fmt"
	"net"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// Limits of a ConfigureNetworkRequest (see agent.proto).
const (
	maxInterfaces = 16
	maxRoutes     = 256
	maxNeighbors  = 256
	// maxLinkName is IFNAMSIZ less the terminating NUL.
	maxLinkName = 15
	// minMTU is the smallest MTU of an IPv4 link, minIPv6MTU of an IPv6 one.
	minMTU     = 68
	minIPv6MTU = 1280
	maxMTU     = 65535
)

// netPlan is a validated ConfigureNetworkRequest in netlink's terms: applying
// it cannot fail on bad input, only on the state of the guest.
type netPlan struct {
	// links are the interfaces, in request order.
	links []linkPlan
	// routes are the routes in the order they are added: those without a
	// gateway (onto the link) first, so that gateways are reachable, each
	// group in request order.
	routes []routePlan
	// neighs are the static neighbour entries, in request order.
	neighs []neighPlan
}

// linkPlan is one interface to move and configure.
type linkPlan struct {
	// deviceMAC finds the NIC in the root namespace.
	deviceMAC net.HardwareAddr
	// name is the interface's name in the container.
	name string
	// mac is the address to set; nil keeps deviceMAC.
	mac net.HardwareAddr
	// mtu is the MTU to set; 0 keeps the device's.
	mtu int
	// addrs are the addresses, each a host address with its prefix length.
	addrs []*net.IPNet
}

// finalMAC is the MAC address the interface has once configured.
func (l *linkPlan) finalMAC() net.HardwareAddr {
	if l.mac != nil {
		return l.mac
	}
	return l.deviceMAC
}

// routePlan is one route to add.
type routePlan struct {
	// index is the route's position in the request, for error messages.
	index int
	// device is the name of the interface the route goes through.
	device string
	// route is the route; its LinkIndex is set once device is known.
	route netlink.Route
}

// neighPlan is one static neighbour entry.
type neighPlan struct {
	// index is the entry's position in the request, for error messages.
	index int
	// device is the name of the interface the entry belongs to.
	device string
	// neigh is the entry; its LinkIndex is set once device is known.
	neigh netlink.Neigh
}

// invalid returns an ErrInvalidArgument error about field.
func invalid(field, format string, args ...any) error {
	return fmt.Errorf("%s: %s: %w", field, fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument)
}

// parseNetwork validates the whole of req before anything is changed. Every
// error is ErrInvalidArgument and names the offending field.
func parseNetwork(req *api.ConfigureNetworkRequest) (*netPlan, error) {
	ifaces, routes, neighs := req.GetInterfaces(), req.GetRoutes(), req.GetNeighbors()
	switch {
	case len(ifaces) > maxInterfaces:
		return nil, invalid("interfaces", "%d given, at most %d allowed", len(ifaces), maxInterfaces)
	case len(routes) > maxRoutes:
		return nil, invalid("routes", "%d given, at most %d allowed", len(routes), maxRoutes)
	case len(neighs) > maxNeighbors:
		return nil, invalid("neighbors", "%d given, at most %d allowed", len(neighs), maxNeighbors)
	}
	plan := &netPlan{}
	names := map[string]bool{}
	devices := map[string]bool{}
	for i, ifc := range ifaces {
		l, err := parseInterface(fmt.Sprintf("interfaces[%d]", i), ifc)
		if err != nil {
			return nil, err
		}
		if names[l.name] {
			return nil, invalid(fmt.Sprintf("interfaces[%d].name", i), "%q is used twice", l.name)
		}
		if devices[l.deviceMAC.String()] {
			return nil, invalid(fmt.Sprintf("interfaces[%d].device_mac", i), "%s is used twice", l.deviceMAC)
		}
		names[l.name], devices[l.deviceMAC.String()] = true, true
		plan.links = append(plan.links, l)
	}
	// A final name must not clash with the name a NIC has on its way in.
	temps := map[string]bool{}
	for _, l := range plan.links {
		temps[tempLinkName(l.deviceMAC)] = true
	}
	for i, l := range plan.links {
		if temps[l.name] {
			return nil, invalid(fmt.Sprintf("interfaces[%d].name", i), "%q is reserved while moving the interfaces", l.name)
		}
	}
	var viaGateway []routePlan
	for i, r := range routes {
		p, err := parseRoute(i, r, names)
		if err != nil {
			return nil, err
		}
		if p.route.Gw != nil {
			viaGateway = append(viaGateway, p)
		} else {
			plan.routes = append(plan.routes, p)
		}
	}
	plan.routes = append(plan.routes, viaGateway...)
	for i, n := range neighs {
		p, err := parseNeighbor(i, n, names)
		if err != nil {
			return nil, err
		}
		plan.neighs = append(plan.neighs, p)
	}
	return plan, nil
}

// parseInterface validates one interface; field is its name in the request.
func parseInterface(field string, ifc *api.Interface) (linkPlan, error) {
	var l linkPlan
	var err error
	if l.deviceMAC, err = parseMAC(field+".device_mac", ifc.GetDeviceMac()); err != nil {
		return l, err
	}
	if ifc.GetMac() != "" {
		if l.mac, err = parseMAC(field+".mac", ifc.GetMac()); err != nil {
			return l, err
		}
	}
	if err := validateLinkName(field+".name", ifc.GetName()); err != nil {
		return l, err
	}
	l.name = ifc.GetName()
	if mtu := ifc.GetMtu(); mtu != 0 && (mtu < minMTU || mtu > maxMTU) {
		return l, invalid(field+".mtu", "%d is outside %d..%d", mtu, minMTU, maxMTU)
	}
	l.mtu = int(ifc.GetMtu())
	for j, s := range ifc.GetAddresses() {
		f := fmt.Sprintf("%s.addresses[%d]", field, j)
		addr, _, err := parseCIDR(f, s)
		if err != nil {
			return l, err
		}
		if addr.IP.To4() == nil && l.mtu != 0 && l.mtu < minIPv6MTU {
			return l, invalid(f, "IPv6 needs an mtu of at least %d, not %d", minIPv6MTU, l.mtu)
		}
		l.addrs = append(l.addrs, addr)
	}
	return l, nil
}

// validateLinkName checks an interface name: 1 to 15 bytes of
// [A-Za-z0-9_.-], and not "lo", "." or ".." (which the kernel refuses).
func validateLinkName(field, name string) error {
	if name == "" || len(name) > maxLinkName {
		return invalid(field, "%q must be 1 to %d bytes", name, maxLinkName)
	}
	for _, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '-'
		if !ok {
			return invalid(field, "%q may only contain [A-Za-z0-9_.-]", name)
		}
	}
	if name == "lo" || name == "." || name == ".." {
		return invalid(field, "%q is reserved", name)
	}
	return nil
}

// parseRoute validates routes[i]; names are the request's interface names.
func parseRoute(i int, r *api.Route, names map[string]bool) (routePlan, error) {
	field := fmt.Sprintf("routes[%d]", i)
	p := routePlan{index: i, device: r.GetDevice()}
	if !names[p.device] {
		return p, invalid(field+".device", "%q is not one of the interfaces", p.device)
	}
	if r.GetScope() > 255 {
		return p, invalid(field+".scope", "%d is not a route scope (0..255)", r.GetScope())
	}
	family := 0
	var err error
	if r.GetDest() != "" {
		var addr *net.IPNet
		if addr, p.route.Dst, err = parseCIDR(field+".dest", r.GetDest()); err != nil {
			return p, err
		}
		if !addr.IP.Equal(p.route.Dst.IP) {
			return p, invalid(field+".dest", "%q has host bits set (the network is %s)", r.GetDest(), p.route.Dst)
		}
		family = ipFamily(addr.IP)
	}
	if r.GetGateway() != "" {
		if p.route.Gw, family, err = parseIPOfFamily(field+".gateway", r.GetGateway(), family); err != nil {
			return p, err
		}
	}
	if r.GetSource() != "" {
		if p.route.Src, family, err = parseIPOfFamily(field+".source", r.GetSource(), family); err != nil {
			return p, err
		}
	}
	if family == 0 {
		// A default route onto the link names no address: IPv4, as with
		// `ip route add default dev X`.
		family = netlink.FAMILY_V4
	}
	if p.route.Dst == nil {
		p.route.Dst = defaultDst(family)
	}
	p.route.Family = family
	p.route.Priority = int(r.GetMetric())
	p.route.Scope = netlink.Scope(r.GetScope())
	if p.route.Scope == netlink.SCOPE_UNIVERSE && p.route.Gw == nil {
		p.route.Scope = netlink.SCOPE_LINK
	}
	return p, nil
}

// parseNeighbor validates neighbors[i]; names are the request's interface
// names.
func parseNeighbor(i int, n *api.Neighbor, names map[string]bool) (neighPlan, error) {
	field := fmt.Sprintf("neighbors[%d]", i)
	p := neighPlan{index: i, device: n.GetDevice()}
	if !names[p.device] {
		return p, invalid(field+".device", "%q is not one of the interfaces", p.device)
	}
	ip, family, err := parseIPOfFamily(field+".ip", n.GetIp(), 0)
	if err != nil {
		return p, err
	}
	mac, err := parseMAC(field+".mac", n.GetMac())
	if err != nil {
		return p, err
	}
	p.neigh = netlink.Neigh{Family: family, State: netlink.NUD_PERMANENT, IP: ip, HardwareAddr: mac}
	return p, nil
}

// parseMAC parses an Ethernet unicast address other than 00:00:00:00:00:00.
func parseMAC(field, s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 {
		return nil, invalid(field, "%q is not a 6-byte MAC address", s)
	}
	if mac[0]&1 != 0 {
		return nil, invalid(field, "%s is a multicast address", mac)
	}
	if [6]byte(mac) == [6]byte{} {
		return nil, invalid(field, "%s is the zero address", mac)
	}
	return mac, nil
}

// parseCIDR parses an address with a prefix length. It returns the address
// itself (host part kept) and the network it is in, IPv4 ones in their
// 4-byte form.
func parseCIDR(field, s string) (addr, network *net.IPNet, err error) {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		return nil, nil, invalid(field, "%q is not an address in CIDR notation", s)
	}
	if ip4 := ip.To4(); ip4 != nil {
		if len(n.Mask) != net.IPv4len {
			return nil, nil, invalid(field, "%q is an IPv4-mapped IPv6 address", s)
		}
		ip = ip4
	}
	return &net.IPNet{IP: ip, Mask: n.Mask}, n, nil
}

// parseIPOfFamily parses an IP address that must be of family unless family
// is 0; it returns the address and its family.
func parseIPOfFamily(field, s string, family int) (net.IP, int, error) {
	ip := net.ParseIP(s)
	if ip == nil {
		return nil, 0, invalid(field, "%q is not an IP address", s)
	}
	if ip4 := ip.To4(); ip4 != nil {
		ip = ip4
	}
	got := ipFamily(ip)
	if family != 0 && got != family {
		return nil, 0, invalid(field, "%s is not of the route's address family", ip)
	}
	return ip, got, nil
}

// ipFamily is netlink.FAMILY_V4 or FAMILY_V6.
func ipFamily(ip net.IP) int {
	if ip.To4() != nil {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// defaultDst is the default route's destination in family: 0.0.0.0/0 or
// ::/0 (dst_len 0, as for no destination at all).
func defaultDst(family int) *net.IPNet {
	if family == netlink.FAMILY_V6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 8*net.IPv6len)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 8*net.IPv4len)}
}
