package guest

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	bxnetns "github.com/boxlite/boxlite/pkg/netns"
)

// dumpRetries bounds the retries of a netlink dump interrupted by a
// concurrent change.
const dumpRetries = 5

// ConfigureNetwork moves the NICs of req into the network namespace of the
// created container req.id and configures them, then adds the routes and the
// static neighbours. The NICs are looked up by MAC in the caller's network
// namespace, the VM's root one: the agent's threads never leave it. A
// retried request finishes what an interrupted one began.
func (a *Agent) ConfigureNetwork(ctx context.Context, req *api.ConfigureNetworkRequest) error {
	plan, err := parseNetwork(req)
	if err != nil {
		return err
	}
	c, err := a.lockedContainer(ctx, req.GetId())
	if err != nil {
		return err
	}
	defer c.unlock()
	if err := c.require("configure the network of", statusCreated); err != nil {
		return err
	}
	target, err := initNetns(c)
	if err != nil {
		return err
	}
	defer target.Close()
	root, err := netns.Get()
	if err != nil {
		return fmt.Errorf("open the agent's network namespace: %w", err)
	}
	defer root.Close()
	if root.Equal(target) {
		return fmt.Errorf("container %s shares the VM's network namespace: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	if err := configureLinks(root, target, plan); err != nil {
		return fmt.Errorf("configure the network of container %s: %w", c.id, err)
	}
	log.G(ctx).WithField("id", c.id).WithField("interfaces", len(plan.links)).Debug("network configured")
	return nil
}

// initNetns opens the network namespace of c's init process. The init is
// checked to be unreaped after the namespace was opened, so its pid had not
// been reused by another process when it was.
func initNetns(c *container) (netns.NsHandle, error) {
	p := c.init
	ns, err := netns.GetFromPid(p.pid)
	exited := errors.Is(err, fs.ErrNotExist)
	if err != nil && !exited {
		return netns.None(), fmt.Errorf("open the network namespace of container %s: %w", c.id, err)
	}
	select {
	case <-p.handle.Done():
		exited = true
	default:
	}
	if exited {
		if ns.IsOpen() {
			ns.Close()
		}
		return netns.None(), fmt.Errorf("container %s: init process %d has exited: %w", c.id, p.pid, errdefs.ErrFailedPrecondition)
	}
	return ns, nil
}

// configureLinks applies plan: it moves every NIC, found by its device MAC
// in root, into target and configures it there, brings target's lo up, then
// adds the routes and the neighbours in target. Every step is idempotent, so
// a retry after a failure completes the work.
func configureLinks(root, target netns.NsHandle, plan *netPlan) error {
	rootH, err := newHandleAt(root)
	if err != nil {
		return fmt.Errorf("netlink in the root namespace: %w", err)
	}
	defer rootH.Close()
	targetH, err := newHandleAt(target)
	if err != nil {
		return fmt.Errorf("netlink in the container's namespace: %w", err)
	}
	defer targetH.Close()
	if err := upLoopback(targetH); err != nil {
		return err
	}
	index := make(map[string]int, len(plan.links))
	for _, l := range plan.links {
		link, err := moveLink(rootH, targetH, target, &l)
		if err == nil {
			err = setupLink(targetH, link, &l)
		}
		if err != nil {
			return fmt.Errorf("interface %s (device %s): %w", l.name, l.deviceMAC, err)
		}
		index[l.name] = link.Attrs().Index
	}
	for _, r := range plan.routes {
		route := r.route
		route.LinkIndex = index[r.device]
		if err := addRoute(targetH, &route); err != nil {
			return fmt.Errorf("routes[%d] (%s dev %s): %w", r.index, describeRoute(&route), r.device, err)
		}
	}
	for _, n := range plan.neighs {
		neigh := n.neigh
		neigh.LinkIndex = index[n.device]
		if err := targetH.NeighSet(&neigh); err != nil {
			return fmt.Errorf("neighbors[%d] (%s lladdr %s dev %s): %w", n.index, neigh.IP, neigh.HardwareAddr, n.device, err)
		}
	}
	return nil
}

// newHandleAt returns a route netlink handle whose socket lives in ns.
// netlink enters ns on the calling thread to open it, and moves back: it
// does so on a locked thread of its own (bxnetns.Do), never on one of the
// agent's.
func newHandleAt(ns netns.NsHandle) (*netlink.Handle, error) {
	var h *netlink.Handle
	err := bxnetns.Do(nil, func() error {
		var err error
		// Route netlink only: the guest kernel has no xfrm or netfilter.
		h, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil && h != nil {
		h.Close()
		h = nil
	}
	return h, err
}

// upLoopback sets lo up (the runtime normally has).
func upLoopback(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	return nil
}

// tempLinkName is the name a NIC has while it moves: unique (it is made of
// the device MAC) and not any kernel name, so two NICs whose names are
// swapped never clash on the way.
func tempLinkName(mac []byte) string { return "bx" + hex.EncodeToString(mac) }

// moveLink finds l's NIC by its device MAC in the root namespace, sets it
// down, renames it to its temporary name and moves it into target. It
// returns the link as target sees it; a NIC that is already there (moved by
// an earlier, interrupted or retried request) is found there instead.
func moveLink(rootH, targetH *netlink.Handle, target netns.NsHandle, l *linkPlan) (netlink.Link, error) {
	links, err := listLinks(rootH)
	if err != nil {
		return nil, err
	}
	tmp := tempLinkName(l.deviceMAC)
	for _, link := range links {
		if !bytes.Equal(link.Attrs().HardwareAddr, l.deviceMAC) {
			continue
		}
		if err := rootH.LinkSetDown(link); err != nil {
			return nil, fmt.Errorf("set down: %w", err)
		}
		if err := rootH.LinkSetName(link, tmp); err != nil {
			return nil, fmt.Errorf("rename %s to %s: %w", link.Attrs().Name, tmp, err)
		}
		if err := rootH.LinkSetNsFd(link, int(target)); err != nil {
			return nil, fmt.Errorf("move into the container's namespace: %w", err)
		}
		break
	}
	return movedLink(targetH, l)
}

// movedLink finds l's NIC in the container's namespace: under its temporary
// name, or under its final name with the device MAC or the final MAC.
func movedLink(h *netlink.Handle, l *linkPlan) (netlink.Link, error) {
	links, err := listLinks(h)
	if err != nil {
		return nil, err
	}
	tmp := tempLinkName(l.deviceMAC)
	for _, link := range links {
		if link.Attrs().Name == tmp {
			return link, nil
		}
	}
	for _, link := range links {
		a := link.Attrs()
		if a.Name == l.name && (bytes.Equal(a.HardwareAddr, l.deviceMAC) || bytes.Equal(a.HardwareAddr, l.finalMAC())) {
			return link, nil
		}
	}
	return nil, fmt.Errorf("no NIC has MAC %s: %w", l.deviceMAC, errdefs.ErrNotFound)
}

// listLinks lists the links of h's namespace.
func listLinks(h *netlink.Handle) ([]netlink.Link, error) {
	links, err := retryDump(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	return links, nil
}

// retryDump runs a netlink dump again while a concurrent change interrupts
// it, up to dumpRetries times in all.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	for i := 1; ; i++ {
		res, err := dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == dumpRetries {
			return res, err
		}
	}
}

// setupLink gives link, in the container's namespace, l's name, MAC, MTU
// and addresses, and sets it up. A link is set down only when it needs a
// new name or MAC, so a retry does not disturb a finished link.
func setupLink(h *netlink.Handle, link netlink.Link, l *linkPlan) error {
	a := link.Attrs()
	rename := a.Name != l.name
	remac := !bytes.Equal(a.HardwareAddr, l.finalMAC())
	if rename || remac {
		if err := h.LinkSetDown(link); err != nil {
			return fmt.Errorf("set down: %w", err)
		}
	}
	if rename {
		if err := h.LinkSetName(link, l.name); err != nil {
			return fmt.Errorf("rename %s to %s: %w", a.Name, l.name, err)
		}
	}
	if remac {
		if err := h.LinkSetHardwareAddr(link, l.finalMAC()); err != nil {
			return fmt.Errorf("set mac %s: %w", l.finalMAC(), err)
		}
	}
	if l.mtu != 0 && a.MTU != l.mtu {
		if err := h.LinkSetMTU(link, l.mtu); err != nil {
			return fmt.Errorf("set mtu %d: %w", l.mtu, err)
		}
	}
	for _, ipnet := range l.addrs {
		addr := &netlink.Addr{IPNet: ipnet}
		if ipnet.IP.To4() == nil {
			// Usable at once: no duplicate address detection.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add address %s: %w", ipnet, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	return nil
}

// addRoute adds r. A route to the same destination with the same metric
// that already exists (EEXIST) is fine when it goes through the same device
// and gateway: an earlier request, or the kernel's prefix route of an
// address, added it. Otherwise it is ErrAlreadyExists.
func addRoute(h *netlink.Handle, r *netlink.Route) error {
	err := h.RouteAdd(r)
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	filter := &netlink.Route{Dst: r.Dst, LinkIndex: r.LinkIndex, Gw: r.Gw}
	same, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(r.Family, filter, netlink.RT_FILTER_DST|netlink.RT_FILTER_OIF|netlink.RT_FILTER_GW)
	})
	switch {
	case err != nil:
		return fmt.Errorf("route exists; list routes: %w", err)
	case len(same) == 0:
		return fmt.Errorf("a different route to %s exists: %w", r.Dst, errdefs.ErrAlreadyExists)
	}
	return nil
}

// describeRoute formats r like `ip route` for error messages.
func describeRoute(r *netlink.Route) string {
	s := r.Dst.String()
	if ones, _ := r.Dst.Mask.Size(); ones == 0 {
		s = "default"
	}
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if r.Src != nil {
		s += " src " + r.Src.String()
	}
	return s
}
