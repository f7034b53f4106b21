package integration

// Networks the tests make themselves: named network namespaces, veth pairs
// and addresses chosen by the test, all on this machine and all removed at
// cleanup. Nothing here ever talks to an address outside the machine.

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/netns"
)

// netSeq numbers the test networks of this test binary (subnets 10.201.N.0/24).
var netSeq atomic.Uint32

// testNet is a box network namespace and a peer namespace joined by a veth
// pair, as a CNI bridge plugin joins them: eth0 (10.201.N.2/24, MTU 1400,
// default route via .1) in the box's, peer0 in the peer's, enslaved to the
// bridge bxbr which holds the gateway address 10.201.N.1/24.
type testNet struct {
	// box and peer are the namespaces' names under /var/run/netns.
	box, peer string
	// boxPath is the box namespace's path, for specs and ctr --with-ns.
	boxPath string
	// n is the network's number; addr and peerAddr are eth0's and peer0's.
	n              uint32
	addr, peerAddr string
	// mtu is eth0's MTU.
	mtu int
}

// newTestNet makes the two namespaces (the veth is added by wire, so a test
// can create a box in the empty namespace first) and removes them at
// cleanup.
func newTestNet(t testing.TB) *testNet {
	t.Helper()
	n := netSeq.Add(1)
	tn := &testNet{
		box: fmt.Sprintf("bxt%d-%d", os.Getpid(), n), peer: fmt.Sprintf("bxp%d-%d", os.Getpid(), n), n: n,
		addr: fmt.Sprintf("10.201.%d.2", n), peerAddr: fmt.Sprintf("10.201.%d.1", n), mtu: 1400,
	}
	tn.boxPath = filepath.Join("/var/run/netns", tn.box)
	for _, ns := range []string{tn.box, tn.peer} {
		mustHost(t, "ip", "netns", "add", ns)
		name := ns
		t.Cleanup(func() { runHost("ip", "netns", "del", name) })
	}
	mustHost(t, "ip", "-n", tn.peer, "link", "set", "lo", "up")
	return tn
}

// wire adds the veth pair, the addresses and the box namespace's default
// route: what a CNI bridge or ptp plugin would do.
func (tn *testNet) wire(t testing.TB) {
	t.Helper()
	mustHost(t, "ip", "link", "add", "bxv"+fmt.Sprint(tn.n), "netns", tn.box, "type", "veth", "peer", "name", "peer0", "netns", tn.peer)
	mustHost(t, "ip", "-n", tn.box, "link", "set", "bxv"+fmt.Sprint(tn.n), "name", "eth0")
	mustHost(t, "ip", "-n", tn.box, "link", "set", "eth0", "mtu", fmt.Sprint(tn.mtu), "up")
	mustHost(t, "ip", "-n", tn.box, "addr", "add", tn.addr+"/24", "dev", "eth0")
	mustHost(t, "ip", "-n", tn.box, "route", "add", "default", "via", tn.peerAddr)
	mustHost(t, "ip", "-n", tn.peer, "link", "add", "bxbr", "type", "bridge")
	mustHost(t, "ip", "-n", tn.peer, "link", "set", "peer0", "mtu", fmt.Sprint(tn.mtu), "master", "bxbr", "up")
	mustHost(t, "ip", "-n", tn.peer, "link", "set", "bxbr", "mtu", fmt.Sprint(tn.mtu), "up")
	mustHost(t, "ip", "-n", tn.peer, "addr", "add", tn.peerAddr+"/24", "dev", "bxbr")
}

// publish forwards the peer's port to the box's port with a DNAT rule in
// the peer namespace, as CNI's portmap plugin publishes a port; it returns
// the published address. The rule goes with the namespace.
func (tn *testNet) publish(t testing.TB, port, boxPort int) string {
	t.Helper()
	mustHost(t, "ip", "netns", "exec", tn.peer, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", tn.peerAddr, "-p", "tcp",
		"--dport", fmt.Sprint(port), "-j", "DNAT", "--to-destination", fmt.Sprintf("%s:%d", tn.addr, boxPort))
	return fmt.Sprintf("%s:%d", tn.peerAddr, port)
}

// mac is eth0's MAC.
func (tn *testNet) mac(t testing.TB) string {
	t.Helper()
	out := mustHost(t, "ip", "-n", tn.box, "-o", "link", "show", "eth0")
	f := strings.Fields(out[strings.Index(out, "link/ether"):])
	return f[1]
}

// serve answers every TCP connection to port in the peer namespace (on
// any address: the peer's may not exist yet) with reply, until cleanup.
func (tn *testNet) serve(t testing.TB, port int, reply string) {
	t.Helper()
	serveIn(t, "/var/run/netns/"+tn.peer, fmt.Sprintf("0.0.0.0:%d", port), reply)
}

// serveIn answers every TCP connection to addr, a listener opened in the
// network namespace at nsPath ("" for ours), with reply and closes it,
// until cleanup.
func serveIn(t testing.TB, nsPath, addr, reply string) {
	t.Helper()
	var l net.Listener
	listen := func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		ns, oerr := netns.Open(nsPath)
		if oerr != nil {
			t.Fatal(oerr)
		}
		err = netns.Do(ns, listen)
		ns.Close()
	}
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(conn, "%s\n", reply)
			conn.Close()
		}
	}()
}

// assertUnwired fails the test if the box namespace still holds a tap of
// the shim or an ingress qdisc (the redirects) once the box is gone.
func (tn *testNet) assertUnwired(t testing.TB) {
	t.Helper()
	var links, qdiscs string
	waitFor(t, settleTimeout, "taps and redirects of "+tn.box+" gone", func() bool {
		links = mustHost(t, "ip", "-n", tn.box, "-o", "link")
		qdiscs = mustHost(t, "tc", "-n", tn.box, "qdisc", "show")
		return !strings.Contains(links, "blxtap") && !strings.Contains(qdiscs, "ingress")
	})
	if strings.Contains(links, "blxtap") || strings.Contains(qdiscs, "ingress") {
		t.Errorf("leak in %s:\n%s\n%s", tn.box, links, qdiscs)
	}
}

// mustHost runs a host command and fails the test if it fails.
func mustHost(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runHost(name, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}
