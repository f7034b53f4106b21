package integration

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// freePort returns a TCP port of the host's loopback that was free a moment
// ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// httpGet polls url until it answers 200 (a box boots first), bounded.
func httpGet(t testing.TB, url string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	var last error
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := c.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && rerr == nil {
				return string(body)
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("GET %s: no answer within 90s: %v", url, last)
	return ""
}

// TestManagerPublishedPortReachesTheBox runs httpd in a box on the default
// (user) network with -p 127.0.0.1:PORT:80, serving a read-only volume: the
// host's loopback reaches it, and inspect shows the port and the box's
// address.
func TestManagerPublishedPortReachesTheBox(t *testing.T) {
	m := newMgr(t)
	www := shortTempDir(t)
	os.WriteFile(filepath.Join(www, "index.html"), []byte("served from the box\n"), 0o644)
	port := freePort(t)
	id := m.runD("-p", fmt.Sprintf("127.0.0.1:%d:80", port), "-v", www+":/www:ro", "--", "httpd", "-f", "-p", "80", "-h", "/www")
	if got := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/index.html", port)); got != "served from the box\n" {
		t.Errorf("GET through the published port: %q", got)
	}
	if got := m.inspect(id, "{{.Network}} {{join .Ports \",\"}} {{range .Interfaces}}{{.Name}} {{join .Addresses \",\"}}{{end}}"); got != fmt.Sprintf("user 127.0.0.1:%d:80 eth0 10.0.2.15/24", port) {
		t.Errorf("inspect: %q", got)
	}
	m.ok("rm", "--force", id)
	// The port is free again: QEMU, which held it, is gone.
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Errorf("port %d still taken after rm: %v", port, err)
	} else {
		l.Close()
	}
}

// TestManagerUserNetworkReachesTheHostLoopback connects from a box to a
// server on the host's loopback through the user network's gateway.
func TestManagerUserNetworkReachesTheHostLoopback(t *testing.T) {
	m := newMgr(t)
	port := freePort(t)
	serveIn(t, "", fmt.Sprintf("127.0.0.1:%d", port), "hello-from-host")
	r := m.run(nil, "run", "--rm", "--rootfs", m.rootfs, "--", "sh", "-c",
		fmt.Sprintf("cat /etc/resolv.conf; nc 10.0.2.2 %d", port))
	if r.code != 0 || !strings.Contains(r.stdout, "hello-from-host") || !strings.Contains(r.stdout, "nameserver 10.0.2.3") {
		t.Errorf("box to the host's loopback: %v", r)
	}
}

// TestManagerNoneNetworkHasOnlyLoopback runs a box with --network none.
func TestManagerNoneNetworkHasOnlyLoopback(t *testing.T) {
	m := newMgr(t)
	r := m.run(nil, "run", "--rm", "--network", "none", "--rootfs", m.rootfs, "--", "ls", "/sys/class/net")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "lo" {
		t.Errorf("--network none: %v, want only lo", r)
	}
}

// TestManagerNetNSNetwork runs a box with --network netns:PATH in a
// namespace the test wired: the box has the veth's address and reaches the
// peer's server; the namespace is left as it was.
func TestManagerNetNSNetwork(t *testing.T) {
	m := newMgr(t)
	tn := newTestNet(t)
	tn.wire(t)
	tn.serve(t, 9002, "hello-from-peer")
	mac := tn.mac(t)
	r := m.run(nil, "run", "--rm", "--network", "netns:"+tn.boxPath, "--rootfs", m.rootfs, "--", "sh", "-c", netProbe(tn.peerAddr, 9002))
	if r.code != 0 {
		t.Errorf("run: %v", r)
	}
	checkNetProbe(t, tn, mac, r.stdout)
	tn.assertUnwired(t)
}

// TestManagerVolumes mounts a rw directory and a read-only file with -v:
// the box's writes show on the host, the file is readable and not
// writable.
func TestManagerVolumes(t *testing.T) {
	m := newMgr(t)
	dir := shortTempDir(t)
	file := filepath.Join(shortTempDir(t), "conf.txt")
	os.WriteFile(file, []byte("setting=1\n"), 0o644)
	r := m.run(nil, "run", "--rm", "-v", dir+":/data", "-v", file+":/etc/conf.txt:ro", "--rootfs", m.rootfs, "--", "sh", "-c",
		"echo from-box > /data/out.txt; cat /etc/conf.txt; echo x >> /etc/conf.txt || echo refused")
	if r.code != 0 || !strings.Contains(r.stdout, "setting=1") || !strings.Contains(r.stdout, "refused") {
		t.Errorf("run with volumes: %v", r)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "out.txt")); string(got) != "from-box\n" {
		t.Errorf("host sees %q, want the box's write", got)
	}
	if got, _ := os.ReadFile(file); string(got) != "setting=1\n" {
		t.Errorf("the read-only file changed: %q", got)
	}
	// A missing source is a usage error before anything starts.
	r = m.run(nil, "run", "--rm", "-v", "/no/such/dir:/data", "--rootfs", m.rootfs, "--", "true")
	if r.code != 2 || !strings.Contains(r.stderr, "/no/such/dir") {
		t.Errorf("missing volume source: %v, want exit 2 naming it", r)
	}
}
