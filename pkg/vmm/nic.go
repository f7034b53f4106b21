package vmm

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// maxNICs bounds Config.NICs: microvm has a fixed number of virtio-mmio
// slots, shared with the share, balloon and serial devices.
const maxNICs = 8

// QEMU user networking (libslirp) addresses as QEMU assigns them by default
// for the 10.0.2.0/24 network: the guest configures them statically.
var (
	// UserNetwork is the guest's subnet.
	UserNetwork = net.IPNet{IP: net.IPv4(10, 0, 2, 0).To4(), Mask: net.CIDRMask(24, 32)}
	// UserGuestIP is the guest's address; port forwards reach it.
	UserGuestIP = net.IPv4(10, 0, 2, 15).To4()
	// UserGatewayIP is the gateway: connections to it reach the host's
	// loopback.
	UserGatewayIP = net.IPv4(10, 0, 2, 2).To4()
	// UserDNSIP is the DNS forwarder.
	UserDNSIP = net.IPv4(10, 0, 2, 3).To4()
	// UserMAC is the guest NIC's MAC with user networking (QEMU's default).
	UserMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
)

// NIC is one virtio-net device of the VM. Exactly one of Tap and User is set.
type NIC struct {
	// MAC is the device's address as the guest first sees it.
	MAC net.HardwareAddr
	// Tap is an open tap device (IFF_TAP|IFF_NO_PI, optionally
	// IFF_VNET_HDR) handed to QEMU; the caller may close its copy once
	// Start returned.
	Tap *os.File
	// User selects QEMU's user networking: outbound NAT and port forwards
	// through sockets QEMU opens in its own network namespace.
	User *UserNet
}

// UserNet configures QEMU user networking.
type UserNet struct {
	// Forwards are the published ports.
	Forwards []Forward
}

// Forward publishes a guest port on the host.
type Forward struct {
	// Proto is "tcp" or "udp".
	Proto string
	// HostIP is the host address to listen on; nil is every address.
	HostIP net.IP
	// HostPort and GuestPort are 1-65535.
	HostPort, GuestPort int
}

// String is the forward as -p takes it: [IP:]HOSTPORT:BOXPORT/PROTO.
func (f Forward) String() string {
	s := strconv.Itoa(f.HostPort) + ":" + strconv.Itoa(f.GuestPort) + "/" + f.Proto
	if f.HostIP != nil {
		s = f.HostIP.String() + ":" + s
	}
	return s
}

// validateNICs checks every NIC.
func validateNICs(nics []NIC) error {
	if len(nics) > maxNICs {
		return invalid("%d NICs: at most %d fit a microvm", len(nics), maxNICs)
	}
	seen := map[string]bool{}
	for i, n := range nics {
		if len(n.MAC) != 6 || n.MAC[0]&1 != 0 {
			return invalid("nic %d: MAC %q is not a unicast Ethernet address", i, n.MAC)
		}
		if seen[n.MAC.String()] {
			return invalid("nic %d: MAC %s is used twice", i, n.MAC)
		}
		seen[n.MAC.String()] = true
		if (n.Tap == nil) == (n.User == nil) {
			return invalid("nic %d: exactly one of a tap and user networking is required", i)
		}
		if n.User != nil {
			if err := validateForwards(i, n.User.Forwards); err != nil {
				return err
			}
		}
	}
	return nil
}

func validateForwards(nic int, fwds []Forward) error {
	bound := map[string]bool{}
	for _, f := range fwds {
		if f.Proto != "tcp" && f.Proto != "udp" {
			return invalid("nic %d: port forward %s: protocol must be tcp or udp", nic, f)
		}
		if f.HostPort < 1 || f.HostPort > 65535 || f.GuestPort < 1 || f.GuestPort > 65535 {
			return invalid("nic %d: port forward %s: ports must be 1 to 65535", nic, f)
		}
		if f.HostIP != nil && f.HostIP.To4() == nil {
			return invalid("nic %d: port forward %s: user networking listens on IPv4 addresses only", nic, f)
		}
		key := f.Proto + "/" + strconv.Itoa(f.HostPort)
		if bound[key] {
			return invalid("nic %d: host port %d/%s is published twice", nic, f.HostPort, f.Proto)
		}
		bound[key] = true
	}
	return nil
}

// nicArgs returns the -netdev/-device pairs of the NICs; tapFD(i) is the
// child's descriptor of NIC i's tap.
func nicArgs(nics []NIC, tapFD func(int) int) []string {
	var args []string
	for i, n := range nics {
		id := "net" + strconv.Itoa(i)
		var netdev string
		if n.User == nil {
			netdev = "tap,id=" + id + ",fd=" + strconv.Itoa(tapFD(i))
		} else {
			netdev = "user,id=" + id + ",net=" + UserNetwork.String() + ",host=" + UserGatewayIP.String() +
				",dns=" + UserDNSIP.String() + ",ipv6=off"
			for _, f := range n.User.Forwards {
				host := ""
				if f.HostIP != nil {
					host = f.HostIP.String()
				}
				netdev += fmt.Sprintf(",hostfwd=%s:%s:%d-%s:%d", f.Proto, host, f.HostPort, UserGuestIP, f.GuestPort)
			}
		}
		args = append(args, "-netdev", netdev, "-device", "virtio-net-device,netdev="+id+",mac="+n.MAC.String())
	}
	return args
}

// startIn starts the monitor through start in the network namespace ns (nil:
// ours). QEMU's Pdeathsig is tied to the thread that forks it: netns.Do runs
// start on a thread that is unlocked (and lives on) once it is back in our
// namespace, or, if that fails, ends with its goroutine, taking the child
// with it (the caller still reaps it, and gets the process and the error).
func startIn(ns *os.File, start func() (*reaper.Process, error)) (*reaper.Process, error) {
	if ns == nil {
		return start()
	}
	var p *reaper.Process
	err := netns.Do(ns, func() error {
		var err error
		p, err = start()
		return err
	})
	return p, err
}

// ParseForward parses a published port as -p takes it:
// [IP:]HOSTPORT:GUESTPORT[/tcp|/udp] (tcp by default).
func ParseForward(s string) (Forward, error) {
	f := Forward{Proto: "tcp"}
	spec := s
	if base, proto, ok := strings.Cut(s, "/"); ok {
		spec, f.Proto = base, proto
	}
	bad := func(why string) (Forward, error) {
		return Forward{}, invalid("port %q: %s: want [IP:]HOSTPORT:BOXPORT[/tcp|udp]", s, why)
	}
	parts := strings.Split(spec, ":")
	switch len(parts) {
	case 2:
	case 3:
		if parts[0] != "" {
			if f.HostIP = net.ParseIP(parts[0]).To4(); f.HostIP == nil {
				return bad("the host address must be an IPv4 address")
			}
		}
		parts = parts[1:]
	default:
		return bad("wrong number of fields")
	}
	var err error
	if f.HostPort, err = strconv.Atoi(parts[0]); err != nil || f.HostPort < 1 || f.HostPort > 65535 {
		return bad("host port must be 1 to 65535")
	}
	if f.GuestPort, err = strconv.Atoi(parts[1]); err != nil || f.GuestPort < 1 || f.GuestPort > 65535 {
		return bad("box port must be 1 to 65535")
	}
	if f.Proto != "tcp" && f.Proto != "udp" {
		return bad("protocol must be tcp or udp")
	}
	return f, nil
}
