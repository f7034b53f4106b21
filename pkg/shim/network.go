package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/network"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// Annotations that choose a box's network instead of its spec's network
// namespace (the manager sets them; containerd's front doors need not).
const (
	// AnnotationNetwork "user" gives the box QEMU's user networking
	// (libslirp): outbound NAT and published ports, with QEMU left in the
	// shim's own network namespace, where it opens its sockets. "none"
	// gives it no NIC at all (loopback only, and no tap to make), with
	// QEMU in a new, empty network namespace.
	AnnotationNetwork = "io.boxlite.network"
	// AnnotationPorts lists the ports published with user networking,
	// comma-separated, each [IP:]HOSTPORT:BOXPORT[/tcp|udp].
	AnnotationPorts = "io.boxlite.network.ports"
)

// AnnotationNetwork's values.
const (
	networkUser = "user"
	networkNone = "none"
)

// netStateFile, in the VM state directory, tells the delete action which
// interfaces of which namespace to unwire after a shim was killed.
const netStateFile = "netns.json"

// netState is netStateFile's content.
type netState struct {
	// NetNS is the namespace's path ("" for one the shim created, which
	// goes with the shim and its VMM).
	NetNS string `json:"netns,omitempty"`
	// Wired are the interfaces redirected to taps.
	Wired []string `json:"wired,omitempty"`
}

// boxNetwork is a box's network: the namespace its VMM runs in and its NICs.
type boxNetwork struct {
	// ns is the namespace QEMU runs in; nil with user networking.
	ns *os.File
	// path is where ns came from ("" when the shim created it).
	path string
	// user is the user networking of the one NIC, nil without.
	user *vmm.UserNet
	// taps are the NICs' taps in ns.
	taps []*network.Tap
	// stateDir receives netStateFile.
	stateDir string

	// mu guards wired.
	mu sync.Mutex
	// wired are the interfaces redirected to taps. Guarded by mu.
	wired []string
}

// newBoxNetwork opens or creates the box's network: with user networking
// when the spec's annotations ask for it, else in the namespace the spec
// names (a path), or a new one (a network entry without a path). A spec
// without a network namespace asks for the host's network, which a VM
// cannot share: that is an error, as with Kata. Taps are made for every
// interface that already has an address, or one for a network configured
// later (at Start); none is wired yet.
func newBoxNetwork(spec *specs.Spec, stateDir string) (_ *boxNetwork, retErr error) {
	n := &boxNetwork{stateDir: stateDir}
	entry, hasEntry := networkNamespace(spec)
	mode := spec.Annotations[AnnotationNetwork]
	switch {
	case mode == networkUser:
		if hasEntry && entry.Path != "" {
			return nil, fmt.Errorf("annotation %s=user and the network namespace %s both choose the box's network: %w",
				AnnotationNetwork, entry.Path, errdefs.ErrInvalidArgument)
		}
		fwds, err := parsePorts(spec.Annotations[AnnotationPorts])
		if err != nil {
			return nil, err
		}
		n.user = &vmm.UserNet{Forwards: fwds}
		return n, nil
	case mode != "" && mode != networkNone:
		return nil, fmt.Errorf("annotation %s=%q: want %q or %q: %w", AnnotationNetwork, mode, networkUser, networkNone, errdefs.ErrInvalidArgument)
	case spec.Annotations[AnnotationPorts] != "":
		return nil, fmt.Errorf("annotation %s needs %s=user: %w", AnnotationPorts, AnnotationNetwork, errdefs.ErrInvalidArgument)
	case mode == networkNone:
		if hasEntry && entry.Path != "" {
			return nil, fmt.Errorf("annotation %s=none and the network namespace %s both choose the box's network: %w",
				AnnotationNetwork, entry.Path, errdefs.ErrInvalidArgument)
		}
		ns, err := netns.New()
		if err != nil {
			return nil, err
		}
		n.ns = ns
		return n, nil
	case !hasEntry:
		return nil, fmt.Errorf("the spec has no network namespace, which asks for the host's network: a VM cannot share it (give the box a network namespace): %w", errdefs.ErrInvalidArgument)
	}
	var err error
	if entry.Path != "" {
		n.ns, err = netns.Open(entry.Path)
		n.path = entry.Path
	} else {
		n.ns, err = netns.New()
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			n.close()
		}
	}()
	if err := n.makeTaps(); err != nil {
		return nil, err
	}
	if err := n.save(); err != nil {
		return nil, err
	}
	return n, nil
}

// networkNamespace returns the spec's network namespace entry.
func networkNamespace(spec *specs.Spec) (specs.LinuxNamespace, bool) {
	if spec.Linux == nil {
		return specs.LinuxNamespace{}, false
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns, true
		}
	}
	return specs.LinuxNamespace{}, false
}

// parsePorts parses AnnotationPorts.
func parsePorts(v string) ([]vmm.Forward, error) {
	var out []vmm.Forward
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		f, err := vmm.ParseForward(p)
		if err != nil {
			return nil, fmt.Errorf("annotation %s: %w", AnnotationPorts, err)
		}
		out = append(out, f)
	}
	return out, nil
}

// makeTaps makes a tap for each interface of the namespace that has an
// address, with its MAC, or one tap with a random MAC when there is none
// yet: a microvm cannot hot-plug a NIC for a network configured later.
func (n *boxNetwork) makeTaps() error {
	links, err := network.Scan(n.ns)
	if err != nil {
		return err
	}
	macs := []net.HardwareAddr{nil}
	if len(links) > 0 {
		macs = macs[:0]
		for _, l := range links {
			macs = append(macs, l.MAC)
		}
	}
	n.taps, err = network.CreateTaps(n.ns, macs)
	return err
}

// nics are the VM's NICs.
func (n *boxNetwork) nics() []vmm.NIC {
	if n.user != nil {
		return []vmm.NIC{{MAC: vmm.UserMAC, User: n.user}}
	}
	var out []vmm.NIC
	for _, t := range n.taps {
		out = append(out, vmm.NIC{MAC: t.MAC, Tap: t.File})
	}
	return out
}

// closeTaps closes the shim's descriptors of the taps once QEMU holds its
// own: each tap then lives exactly as long as the VMM.
func (n *boxNetwork) closeTaps() {
	for _, t := range n.taps {
		t.Close()
	}
}

// wire connects the namespace's interfaces to the VM's NICs and returns
// what the guest must configure; nil when there is nothing to configure (a
// namespace still without an interface starts with loopback only, which is
// logged). It runs at Start, when every front door has configured the
// namespace.
func (n *boxNetwork) wire(ctx context.Context, id string) (*api.ConfigureNetworkRequest, error) {
	if n.user != nil {
		return userConfig(id), nil
	}
	if len(n.taps) == 0 {
		return nil, nil // io.boxlite.network=none: no NIC
	}
	links, err := network.Scan(n.ns)
	if err != nil {
		return nil, err
	}
	if len(links) == 0 {
		log.G(ctx).WithField("id", id).Info("the box's network namespace has no interface with an address: it starts with loopback only")
		return nil, nil
	}
	if len(links) > len(n.taps) {
		return nil, fmt.Errorf("the box's network namespace has %d interfaces with an address but its VM was booted with %d NIC(s), and a microvm cannot add one: configure the namespace before the task is created: %w",
			len(links), len(n.taps), errdefs.ErrFailedPrecondition)
	}
	var pairs []network.Pair
	names := make([]string, len(links))
	for i, l := range links {
		pairs = append(pairs, network.Pair{Link: l, Tap: n.taps[i]})
		names[i] = l.Name
	}
	n.mu.Lock()
	n.wired = names
	n.mu.Unlock()
	if err := n.save(); err != nil {
		return nil, err
	}
	cfg, err := network.Wire(n.ns, pairs)
	if err != nil {
		return nil, err
	}
	return guestConfig(id, cfg), nil
}

// teardown removes the redirects from the namespace's interfaces (the taps
// go with the VMM) and closes the namespace; one the shim created is gone
// once its VMM is. Call it after the VMM was reaped.
func (n *boxNetwork) teardown() error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	wired := n.wired
	n.wired = nil
	n.mu.Unlock()
	var err error
	if n.ns != nil && n.path != "" && len(wired) > 0 {
		err = network.Unwire(n.ns, wired)
	}
	n.close()
	return err
}

func (n *boxNetwork) close() {
	n.closeTaps()
	if n.ns != nil {
		n.ns.Close()
	}
}

// save records the namespace's path and the wired interfaces for the
// delete action.
func (n *boxNetwork) save() error {
	if n.path == "" {
		return nil
	}
	n.mu.Lock()
	st := netState{NetNS: n.path, Wired: n.wired}
	n.mu.Unlock()
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := filepath.Join(n.stateDir, netStateFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("network state: %w", err)
	}
	return os.Rename(tmp, filepath.Join(n.stateDir, netStateFile))
}

// unwireStale undoes the redirects a killed shim left in a namespace it did
// not create, as recorded in stateDir. A namespace that is gone is fine.
func unwireStale(stateDir string) error {
	data, err := os.ReadFile(filepath.Join(stateDir, netStateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var st netState
	if err := json.Unmarshal(data, &st); err != nil || st.NetNS == "" || len(st.Wired) == 0 {
		return nil
	}
	ns, err := netns.Open(st.NetNS)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer ns.Close()
	return network.Unwire(ns, st.Wired)
}

// userConfig is the guest configuration of QEMU's user network.
func userConfig(id string) *api.ConfigureNetworkRequest {
	ones, _ := vmm.UserNetwork.Mask.Size()
	return &api.ConfigureNetworkRequest{
		Id: id,
		Interfaces: []*api.Interface{{
			DeviceMac: vmm.UserMAC.String(), Name: "eth0", Mtu: 1500,
			Addresses: []string{fmt.Sprintf("%s/%d", vmm.UserGuestIP, ones)},
		}},
		Routes: []*api.Route{{Gateway: vmm.UserGatewayIP.String(), Device: "eth0"}},
	}
}

// retargetMACs points the guest's configuration at its NICs as it finds
// them: a VM restored from a template has the template's MACs, and the
// agent then sets the box's own (the MAC the NIC was given).
func retargetMACs(req *api.ConfigureNetworkRequest, nics []vmm.NIC, seen []net.HardwareAddr) {
	for _, i := range req.Interfaces {
		for k, n := range nics {
			if k >= len(seen) || i.DeviceMac != n.MAC.String() || n.MAC.String() == seen[k].String() {
				continue
			}
			if i.Mac == "" {
				i.Mac = i.DeviceMac
			}
			i.DeviceMac = seen[k].String()
			break
		}
	}
}

// guestConfig converts the namespace's configuration for the agent.
func guestConfig(id string, cfg *network.Config) *api.ConfigureNetworkRequest {
	req := &api.ConfigureNetworkRequest{Id: id}
	for _, i := range cfg.Interfaces {
		gi := &api.Interface{DeviceMac: i.DeviceMAC.String(), Name: i.Name, Mac: i.MAC.String(), Mtu: uint32(i.MTU)}
		for _, a := range i.Addrs {
			gi.Addresses = append(gi.Addresses, a.String())
		}
		req.Interfaces = append(req.Interfaces, gi)
	}
	for _, r := range cfg.Routes {
		gr := &api.Route{Device: r.Dev, Metric: uint32(r.Metric), Scope: uint32(r.Scope)}
		if r.Dst != nil {
			gr.Dest = r.Dst.String()
		}
		if r.Gw != nil {
			gr.Gateway = r.Gw.String()
		}
		if r.Src != nil {
			gr.Source = r.Src.String()
		}
		req.Routes = append(req.Routes, gr)
	}
	for _, nb := range cfg.Neighbors {
		req.Neighbors = append(req.Neighbors, &api.Neighbor{Ip: nb.IP.String(), Mac: nb.MAC.String(), Device: nb.Dev})
	}
	return req
}

// startNetwork wires the sandbox's network namespace to its VM and
// configures the guest's interfaces in the network namespace of the
// sandbox's own container (a pod's app containers join it), just before
// that container's process starts, and records the result for `boxlite
// inspect`.
func (b *sandbox) startNetwork(ctx context.Context) error {
	cfg, err := b.net.wire(ctx, b.id)
	if err != nil {
		return fmt.Errorf("network of %s: %w", b.id, err)
	}
	info := network.Info{Mode: "netns", NetNS: b.net.path}
	if b.net.ns != nil && len(b.net.taps) == 0 {
		info.Mode = "none"
	}
	if b.net.user != nil {
		info.Mode = "user"
		for _, f := range b.net.user.Forwards {
			info.Ports = append(info.Ports, f.String())
		}
	}
	if cfg != nil {
		retargetMACs(cfg, b.net.nics(), b.vm.GuestMACs())
		if _, err := b.vm.Agent().ConfigureNetwork(ctx, cfg); err != nil {
			return fmt.Errorf("configure the network of %s in the guest: %w", b.id, err)
		}
		for _, i := range cfg.Interfaces {
			mac := i.Mac
			if mac == "" {
				mac = i.DeviceMac
			}
			info.Interfaces = append(info.Interfaces, network.InfoInterface{Name: i.Name, MAC: mac, Addresses: i.Addresses})
		}
	}
	if err := network.WriteInfo(b.bundle, info); err != nil {
		log.G(ctx).WithError(err).WithField("id", b.id).Warn("write network info")
	}
	return nil
}
