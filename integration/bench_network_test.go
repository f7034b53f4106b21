package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// netperfSeconds is how long one throughput sample sends.
const netperfSeconds = 3

// buildNetperf builds the static box side of the network benchmarks into a
// directory to mount in the box.
func buildNetperf(t testing.TB) string {
	t.Helper()
	dir := shortTempDir(t)
	cmd := []string{"go", "build", "-C", repoRoot, "-o", filepath.Join(dir, "netperf"), "./integration/testdata/netperf"}
	if _, err := runHostEnv(5*time.Minute, []string{"CGO_ENABLED=0"}, cmd[0], cmd[1:]...); err != nil {
		t.Fatalf("build netperf: %v", err)
	}
	return dir
}

// inNS runs fn with sockets made in the namespace at path ("" for ours).
func inNS(t testing.TB, path string, fn func() error) {
	t.Helper()
	if path == "" {
		if err := fn(); err != nil {
			t.Fatal(err)
		}
		return
	}
	ns, err := netns.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := netns.Do(ns, fn); err != nil {
		t.Fatal(err)
	}
}

// hostSend connects to addr from the namespace at nsPath and sends for the
// sample time; it retries the connection while the other side starts.
func hostSend(t testing.TB, nsPath, addr string) {
	t.Helper()
	var c net.Conn
	deadline := time.Now().Add(90 * time.Second)
	for {
		var err error
		inNS(t, nsPath, func() error {
			c, err = net.DialTimeout("tcp", addr, 2*time.Second)
			return nil
		})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to %s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	for end := time.Now().Add(netperfSeconds * time.Second); time.Now().Before(end); {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("send to %s: %v", addr, err)
		}
	}
}

// hostRecv listens on addr in the namespace at nsPath and reads one
// connection's data in the background; the returned function waits for it
// and returns its rate in Mbit/s.
func hostRecv(t testing.TB, nsPath, addr string) func() float64 {
	t.Helper()
	var l net.Listener
	inNS(t, nsPath, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	type result struct {
		rate float64
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		defer l.Close()
		c, err := l.Accept()
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer c.Close()
		began := time.Now()
		n, err := io.Copy(io.Discard, c)
		ch <- result{rate: mbits(n, time.Since(began)), err: err}
	}()
	return func() float64 {
		select {
		case r := <-ch:
			if r.err != nil {
				t.Fatalf("receive on %s: %v", addr, r.err)
			}
			return r.rate
		case <-time.After(2 * time.Minute):
			l.Close()
			t.Fatalf("receive on %s: nothing within 2m", addr)
		}
		return 0
	}
}

func mbits(n int64, d time.Duration) float64 { return float64(n) * 8 / d.Seconds() / 1e6 }

// parseRate reads netperf's last line, "<bytes> <seconds>", as Mbit/s.
func parseRate(t testing.TB, out string) float64 {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var n int64
	var s float64
	if _, err := fmt.Sscanf(lines[len(lines)-1], "%d %f", &n, &s); err != nil || s <= 0 {
		t.Fatalf("netperf printed %q", out)
	}
	return float64(n) * 8 / s / 1e6
}

// boxCmd is a `boxlite exec` running in the background.
type boxCmd struct {
	p    *reaper.Process
	out  *syncBuffer
	errb *syncBuffer
	args []string
}

// boxExec starts `boxlite exec ID -- args...` in the background.
func (m *mgr) boxExec(t testing.TB, id string, args ...string) *boxCmd {
	t.Helper()
	cmd := m.command(append([]string{"exec", id, "--"}, args...)...)
	bc := &boxCmd{out: &syncBuffer{}, errb: &syncBuffer{}, args: args}
	cmd.Stdout, cmd.Stderr = bc.out, bc.errb
	p, err := reaper.Default().Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	bc.p = p
	return bc
}

// waitOutput waits (bounded) until the command printed s.
func (bc *boxCmd) waitOutput(t testing.TB, s string) {
	t.Helper()
	waitFor(t, 2*time.Minute, fmt.Sprintf("%q from %v", s, bc.args), func() bool {
		select {
		case <-bc.p.Done():
			t.Fatalf("exec %v ended early: %s", bc.args, bc.errb.String())
		default:
		}
		return strings.Contains(bc.out.String(), s)
	})
}

// wait waits for the command and returns its output.
func (bc *boxCmd) wait(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := bc.p.Wait(ctx)
	if err != nil || e.Status != 0 {
		t.Fatalf("exec %v: %v %v: %s", bc.args, e, err, bc.errb.String())
	}
	return bc.out.String()
}

// medianF is the median of xs.
func medianF(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkNetworkThroughput measures TCP throughput between a box and the
// host, both ways, through the tap of a box in a network namespace (to the
// veth's peer namespace) and through QEMU's user network (the host's
// loopback, via the gateway and a published port), beside the same
// transfer between two network namespaces joined by a veth pair (the
// floor). Mbit/s, medians of b.N samples of 3 s each.
func BenchmarkNetworkThroughput(b *testing.B) {
	m := newMgr(b)
	np := buildNetperf(b)
	tn := newTestNet(b)
	tn.wire(b)
	peerNS := "/var/run/netns/" + tn.peer
	// The floor has a veth pair of its own: the box's is redirected to
	// its tap.
	fl := newTestNet(b)
	fl.wire(b)
	flPeerNS := "/var/run/netns/" + fl.peer
	tapBox := m.runD("--network", "netns:"+tn.boxPath, "-v", np+":/np:ro", "--", "sleep", "100000")
	defer m.ok("rm", "--force", tapBox)
	port := freePort(b)
	userBox := m.runD("-p", fmt.Sprintf("127.0.0.1:%d:5201", port), "-v", np+":/np:ro", "--", "sleep", "100000")
	defer m.ok("rm", "--force", userBox)

	rates := map[string][]float64{}
	for i := 0; i < b.N; i++ {
		// Floor: namespace to namespace over the veth, both ends here.
		done := hostRecv(b, flPeerNS, fl.peerAddr+":5301")
		hostSend(b, fl.boxPath, fl.peerAddr+":5301")
		rates["veth"] = append(rates["veth"], done())

		// Tap: host (the peer namespace) to box and back.
		recv := m.boxExec(b, tapBox, "/np/netperf", "recv", "5201")
		recv.waitOutput(b, "listening")
		hostSend(b, peerNS, tn.addr+":5201")
		rates["tap-in"] = append(rates["tap-in"], parseRate(b, recv.wait(b)))
		done = hostRecv(b, peerNS, tn.peerAddr+":5302")
		m.boxExec(b, tapBox, "/np/netperf", "send", tn.peerAddr+":5302", fmt.Sprint(netperfSeconds)).wait(b)
		rates["tap-out"] = append(rates["tap-out"], done())

		// User network: the published port in, the gateway out.
		recv = m.boxExec(b, userBox, "/np/netperf", "recv", "5201")
		recv.waitOutput(b, "listening")
		hostSend(b, "", fmt.Sprintf("127.0.0.1:%d", port))
		rates["user-in"] = append(rates["user-in"], parseRate(b, recv.wait(b)))
		hport := freePort(b)
		done = hostRecv(b, "", fmt.Sprintf("127.0.0.1:%d", hport))
		m.boxExec(b, userBox, "/np/netperf", "send", fmt.Sprintf("10.0.2.2:%d", hport), fmt.Sprint(netperfSeconds)).wait(b)
		rates["user-out"] = append(rates["user-out"], done())
	}
	floor := medianF(rates["veth"])
	fmt.Printf("\nTCP throughput, Mbit/s, median of %d samples of %d s (host = the veth's peer namespace for the tap, the host's loopback for user networking)\n", b.N, netperfSeconds)
	fmt.Printf("%-30s %10s %10s\n", "path", "Mbit/s", "of floor")
	for _, row := range []struct{ key, name string }{
		{"veth", "veth, namespace to namespace"},
		{"tap-in", "tap, host -> box"}, {"tap-out", "tap, box -> host"},
		{"user-in", "user net, host -> box (-p)"}, {"user-out", "user net, box -> host"},
	} {
		v := medianF(rates[row.key])
		fmt.Printf("%-30s %10.0f %9.1f%%\n", row.name, v, 100*v/floor)
		b.ReportMetric(v, row.key+"-Mbit/s")
	}
}
