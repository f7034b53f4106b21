package integration

// nerdctl against boxlite, each step compared with the same command under
// runc in the same test (see nerdctl_harness_test.go for the isolation and
// the cleanup checks). Wall times per step and runtime are logged.

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNerdctlRunRmPrintsAndPropagatesTheExitCode runs `nerdctl run --rm
// --net none` in the foreground: the output arrives and the process's exit
// code becomes nerdctl's.
func TestNerdctlRunRmPrintsAndPropagatesTheExitCode(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		r, _ := n.run(t, "run --rm echo", rt, "--rm", "--net", "none", testImage, "echo", "hi")
		if r.code != 0 || r.stdout != "hi\n" {
			t.Errorf("%s: echo hi: exit %d stdout %q stderr %q", shortRuntime(rt), r.code, r.stdout, r.stderr)
		}
		r, _ = n.run(t, "run --rm exit 3", rt, "--rm", "--net", "none", testImage, "sh", "-c", "exit 3")
		if r.code != 3 {
			t.Errorf("%s: exit 3: nerdctl exited %d, stderr %q", shortRuntime(rt), r.code, r.stderr)
		}
	}
}

// TestNerdctlDetachedLogsStopRm runs a detached box that prints lines and
// traps SIGTERM: `nerdctl logs` shows the lines, `nerdctl stop` delivers
// SIGTERM and returns well within its timeout, the container is exited
// with the trap's code, and `nerdctl rm` removes it. A box that ignores
// SIGTERM is killed when stop's timeout expires (exit 137).
func TestNerdctlDetachedLogsStopRm(t *testing.T) {
	n := startNerdctl(t)
	const stopTimeout = 10 * time.Second
	script := "trap 'echo got-term; exit 7' TERM; for i in 1 2 3; do echo line-$i; done; sleep 600 & wait"
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		r, id := n.run(t, "run -d", rt, "-d", "--net", "none", testImage, "sh", "-c", script)
		if r.code != 0 || id == "" || strings.TrimSpace(r.stdout) != id {
			t.Fatalf("%s: run -d: exit %d stdout %q stderr %q (cid %q)", name, r.code, r.stdout, r.stderr, id)
		}
		var logs ctrResult
		began := time.Now()
		waitFor(t, time.Minute, name+": the box's lines in nerdctl logs", func() bool {
			logs = n.nerdctl(t, "logs", id)
			return logs.code == 0 && strings.Contains(logs.stdout, "line-3")
		})
		n.times.add("run -d → lines in logs", rt, time.Since(began))
		if want := "line-1\nline-2\nline-3\n"; logs.stdout != want {
			t.Errorf("%s: nerdctl logs: %q, want %q", name, logs.stdout, want)
		}
		r = n.timed(t, "stop (traps TERM)", rt, "stop", "--time", fmt.Sprint(int(stopTimeout.Seconds())), id)
		if r.code != 0 {
			t.Errorf("%s: stop: exit %d stderr %q", name, r.code, r.stderr)
		}
		if r.elapsed > stopTimeout {
			t.Errorf("%s: stop took %v, more than its %v timeout: SIGTERM was not delivered", name, r.elapsed, stopTimeout)
		}
		if st := strings.TrimSpace(n.must(t, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", id)); st != "exited 7" {
			t.Errorf("%s: after stop the container is %q, want \"exited 7\"", name, st)
		}
		if logs := n.must(t, "logs", id); !strings.Contains(logs, "got-term") {
			t.Errorf("%s: logs after stop lack the trap's output: %q", name, logs)
		}
		if r := n.timed(t, "rm", rt, "rm", id); r.code != 0 {
			t.Errorf("%s: rm: exit %d stderr %q", name, r.code, r.stderr)
		}
		if ps := n.must(t, "ps", "-a", "-q", "--no-trunc"); strings.Contains(ps, id) {
			t.Errorf("%s: %s still listed after rm: %q", name, id, ps)
		}

		// sleep as the container's pid 1 has no handler: SIGTERM does
		// nothing, and stop kills it when its timeout expires.
		r, id = n.run(t, "run -d sleep", rt, "-d", "--net", "none", testImage, "sleep", "600")
		if r.code != 0 || id == "" {
			t.Fatalf("%s: run -d sleep: exit %d stderr %q", name, r.code, r.stderr)
		}
		if ps := n.must(t, "ps", "-q", "--no-trunc"); !strings.Contains(ps, id) {
			t.Errorf("%s: running %s not in nerdctl ps: %q", name, id, ps)
		}
		const grace = 2 * time.Second
		r = n.timed(t, "stop --time 2 (ignores TERM)", rt, "stop", "--time", "2", id)
		if r.code != 0 || r.elapsed < grace || r.elapsed > grace+5*time.Second {
			t.Errorf("%s: stop --time 2 of a box ignoring SIGTERM: exit %d after %v (stderr %q), want 0 after about 2s", name, r.code, r.elapsed, r.stderr)
		}
		if st := strings.TrimSpace(n.must(t, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", id)); st != "exited 137" {
			t.Errorf("%s: after stop --time 2 the container is %q, want \"exited 137\"", name, st)
		}
		n.must(t, "rm", id)
	}
}

// TestNerdctlExec runs `nerdctl exec` in a running box (nerdctl's exec ids
// have 69 characters): its output and its exit code come back, and with -it
// on a pseudo-terminal too.
func TestNerdctlExec(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		r, id := n.run(t, "run -d", rt, "-d", "--net", "none", testImage, "sleep", "600")
		if r.code != 0 || id == "" {
			t.Fatalf("%s: run -d: exit %d stderr %q", name, r.code, r.stderr)
		}
		r = n.timed(t, "exec echo", rt, "exec", id, "sh", "-c", "echo in-exec")
		if r.code != 0 || r.stdout != "in-exec\n" {
			t.Errorf("%s: exec: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		// nerdctl exec reports a failed process as its own exit 1 and
		// names the code, under runc too.
		r = n.timed(t, "exec exit 5", rt, "exec", id, "sh", "-c", "exit 5")
		if r.code != 1 || !strings.Contains(r.stderr, "exit code 5") {
			t.Errorf("%s: exec exit 5: nerdctl exited %d, stderr %q, want 1 and \"exit code 5\"", name, r.code, r.stderr)
		}
		r = n.tty(t, "exec -it (pty)", rt, "exec", "-it", id, "sh", "-c", "test -t 0 && test -t 1 && echo exec-tty-ok")
		if r.code != 0 || !strings.Contains(r.stdout, "exec-tty-ok") {
			t.Errorf("%s: exec -it: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		if r := n.timed(t, "rm -f (running)", rt, "rm", "-f", id); r.code != 0 {
			t.Errorf("%s: rm -f: exit %d stderr %q", name, r.code, r.stderr)
		}
	}
}

// TestNerdctlVolumes mounts host directories with -v: a write to a rw
// volume shows on the host, a :ro volume is readable and refuses writes.
func TestNerdctlVolumes(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		dir := shortTempDir(t)
		rw, ro := filepath.Join(dir, "rw"), filepath.Join(dir, "ro")
		os.MkdirAll(rw, 0o755)
		os.MkdirAll(ro, 0o755)
		os.WriteFile(filepath.Join(ro, "in.txt"), []byte("from-the-host\n"), 0o644)
		script := "echo written > /data/out.txt && cat /ro/in.txt && if echo x > /ro/new.txt; then echo ro-write-ok; else echo ro-refused; fi"
		r, _ := n.run(t, "run --rm -v rw,ro", rt, "--rm", "--net", "none", "-v", rw+":/data", "-v", ro+":/ro:ro", testImage, "sh", "-c", script)
		if r.code != 0 || r.stdout != "from-the-host\nro-refused\n" || !strings.Contains(r.stderr, "Read-only file system") {
			t.Errorf("%s: volumes: exit %d stdout %q stderr %q, want the ro file and a refused write", name, r.code, r.stdout, r.stderr)
		}
		if got, _ := os.ReadFile(filepath.Join(rw, "out.txt")); string(got) != "written\n" {
			t.Errorf("%s: the host sees %q in the rw volume, want the box's write", name, got)
		}
		if _, err := os.Stat(filepath.Join(ro, "new.txt")); err == nil {
			t.Errorf("%s: a write went through the ro volume", name)
		}
	}
}

// TestNerdctlNetworkNoneHasLoopbackOnly runs --network none: the box sees
// lo and nothing else.
func TestNerdctlNetworkNoneHasLoopbackOnly(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		r, _ := n.run(t, "run --rm --network none", rt, "--rm", "--network", "none", testImage, "ls", "/sys/class/net")
		if r.code != 0 || strings.Join(strings.Fields(r.stdout), " ") != "lo" {
			t.Errorf("%s: interfaces %q (exit %d, stderr %q), want only lo", shortRuntime(rt), r.stdout, r.code, r.stderr)
		}
	}
}

// TestNerdctlDefaultBridge runs boxes on nerdctl's default bridge: the box
// gets an address in 10.4.0.0/24 and reaches a server on the bridge's host
// side; a published port (-p 127.0.0.1:HOST:80) reaches httpd in the box
// from the namespace's loopback; and nerdctl inspect shows the box's own
// address, the one it has inside.
func TestNerdctlDefaultBridge(t *testing.T) {
	n := startNerdctl(t)
	const serverPort, hostPortBase = 9100, 18080
	serveIn(t, n.nsPath, fmt.Sprintf("0.0.0.0:%d", serverPort), "hello-from-bridge-host")
	_, bridge, _ := net.ParseCIDR("10.4.0.0/24")
	for i, rt := range bothRuntimes {
		name := shortRuntime(rt)
		probe := fmt.Sprintf("ip -o -4 addr show eth0; nc %s %d", nerdctlBridgeGateway, serverPort)
		r, _ := n.run(t, "run --rm bridge probe", rt, "--rm", testImage, "sh", "-c", probe)
		if r.code != 0 || !strings.Contains(r.stdout, "hello-from-bridge-host") {
			t.Errorf("%s: bridge probe: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		if ip := inetAddr(r.stdout); ip == nil || !bridge.Contains(ip) || ip.String() == nerdctlBridgeGateway {
			t.Errorf("%s: eth0 has %v (%q), want an address in %v", name, ip, r.stdout, bridge)
		}
		if out := n.inNS(t, "ip", "-o", "-4", "addr", "show", "nerdctl0"); !strings.Contains(out, "inet "+nerdctlBridgeGateway+"/24") {
			t.Errorf("%s: nerdctl0 in the test's namespace: %q, want %s/24", name, out, nerdctlBridgeGateway)
		}

		www := shortTempDir(t)
		page := "hello-from-httpd-" + name
		os.WriteFile(filepath.Join(www, "index.html"), []byte(page+"\n"), 0o644)
		hostPort := hostPortBase + i
		r, id := n.run(t, "run -d -p httpd", rt, "-d", "-p", fmt.Sprintf("127.0.0.1:%d:80", hostPort),
			"-v", www+":/www:ro", testImage, "httpd", "-f", "-p", "80", "-h", "/www")
		if r.code != 0 || id == "" {
			t.Fatalf("%s: run -d -p: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		var resp string
		var err error
		began := time.Now()
		deadline := began.Add(time.Minute)
		for time.Now().Before(deadline) {
			if resp, err = n.httpGet(fmt.Sprintf("127.0.0.1:%d", hostPort)); err == nil && strings.Contains(resp, page) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		n.times.add("run -d -p → http answer", rt, time.Since(began))
		if !strings.Contains(resp, page) {
			t.Errorf("%s: GET 127.0.0.1:%d: %v, response %q", name, hostPort, err, resp)
		}
		inspected := strings.TrimSpace(n.must(t, "inspect", "--format", "{{.NetworkSettings.IPAddress}}", id))
		inside := inetAddr(n.must(t, "exec", id, "ip", "-o", "-4", "addr", "show", "eth0"))
		if ip := net.ParseIP(inspected); ip == nil || !bridge.Contains(ip) || inside == nil || !ip.Equal(inside) {
			t.Errorf("%s: nerdctl inspect shows %q, the box has %v: want its own address in %v", name, inspected, inside, bridge)
		}
		if r := n.timed(t, "rm -f (running)", rt, "rm", "-f", id); r.code != 0 {
			t.Errorf("%s: rm -f: exit %d stderr %q", name, r.code, r.stderr)
		}
	}
}

// inetAddr parses the address of the first "inet A/N" in ip's output.
func inetAddr(out string) net.IP {
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "inet" {
			ip, _, err := net.ParseCIDR(f[i+1])
			if err == nil {
				return ip
			}
		}
	}
	return nil
}

// TestNerdctlRunWithTerminal runs `nerdctl run -it` on a pseudo-terminal
// (script(1)): the output comes through the terminal, and the exit code.
func TestNerdctlRunWithTerminal(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		r, _ := n.runTTY(t, "run -it --rm", rt, "-it", "--rm", "--net", "none", testImage, "sh", "-c", "test -t 0 && test -t 1 && echo tty-ok")
		if r.code != 0 || !strings.Contains(r.stdout, "tty-ok") {
			t.Errorf("%s: run -it: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		r, _ = n.runTTY(t, "run -it --rm exit 4", rt, "-it", "--rm", "--net", "none", testImage, "sh", "-c", "exit 4")
		if r.code != 4 {
			t.Errorf("%s: run -it exit 4: exited %d, stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
	}
}

// TestNerdctlFailingCreateFailsFastAndLeavesNothing runs a command the
// image does not have, in the foreground (FIFOs) and detached (nerdctl's
// binary:// logger), without and with a bridge network (whose
// createRuntime hook ran CNI before the create failed): nerdctl fails with
// an error naming the command, under boxlite about as fast as under runc
// plus a VM boot, and no container, process, mount, CNI allocation or
// interface is left. (A -v source that does not exist is no failure:
// nerdctl creates it, as docker does.)
func TestNerdctlFailingCreateFailsFastAndLeavesNothing(t *testing.T) {
	n := startNerdctl(t)
	cases := []struct {
		name string
		args []string
	}{
		{"--rm --net none", []string{"--rm", "--net", "none"}},
		{"-d --net none", []string{"-d", "--net", "none"}},
		{"--rm --net bridge", []string{"--rm", "--net", "bridge"}},
	}
	elapsed := map[string]time.Duration{}
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		for _, c := range cases {
			step := "missing cmd " + c.name
			r, _ := n.run(t, step, rt, append(c.args, testImage, "/no/such/cmd")...)
			if r.code == 0 || !strings.Contains(r.stderr, "/no/such/cmd") {
				t.Errorf("%s %s: missing command: exit %d stderr %q, want an error naming it", name, c.name, r.code, r.stderr)
			}
			elapsed[rt+step] = r.elapsed
			t.Logf("%s %s: exit %d: %s", name, c.name, r.code, strings.TrimSpace(r.stderr))
		}
		// nerdctl keeps a detached container whose task failed, as
		// docker does; it must be removable.
		for _, id := range strings.Fields(n.must(t, "ps", "-a", "-q", "--no-trunc")) {
			if r := n.nerdctl(t, "rm", "-f", id); r.code != 0 {
				t.Errorf("%s: rm -f of the failed container %s: exit %d: %s", name, id, r.code, r.stderr)
			}
		}
	}
	// A VM boots in about 1.5 s here; anything near the old 10 s wait for
	// the binary:// logger is a regression.
	for _, c := range cases {
		step := "missing cmd " + c.name
		if d, ref := elapsed[boxliteRuntime+step], elapsed[runcRuntime+step]; d > ref+5*time.Second {
			t.Errorf("%s: a failing create took %v under boxlite, %v under runc", c.name, d, ref)
		}
	}
}

// TestNerdctlBoxesOnTheBridgeFindEachOther runs two detached boxes on the
// default bridge: each has its short id as hostname, the first one's
// /etc/hosts (a file nerdctl rewrites on the host, shared into the VM)
// gains the second one's name and address, and it pings the second by
// name across the bridge.
func TestNerdctlBoxesOnTheBridgeFindEachOther(t *testing.T) {
	n := startNerdctl(t)
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		ids := map[string]string{}
		for _, box := range []string{"a", "b"} {
			r, id := n.run(t, "run -d --name "+box, rt, "-d", "--name", box+"-"+name, testImage, "sleep", "600")
			if r.code != 0 || id == "" {
				t.Fatalf("%s: run -d %s: exit %d stderr %q", name, box, r.code, r.stderr)
			}
			ids[box] = id
		}
		if h := strings.TrimSpace(n.must(t, "exec", ids["a"], "hostname")); h != ids["a"][:12] {
			t.Errorf("%s: hostname %q, want the short id %s", name, h, ids["a"][:12])
		}
		bIP := inetAddr(n.must(t, "exec", ids["b"], "ip", "-o", "-4", "addr", "show", "eth0"))
		var hosts string
		waitFor(t, 10*time.Second, name+": b in a's /etc/hosts", func() bool {
			hosts = n.must(t, "exec", ids["a"], "cat", "/etc/hosts")
			for _, l := range strings.Split(hosts, "\n") {
				if f := strings.Fields(l); len(f) == 3 && bIP != nil && f[0] == bIP.String() && f[2] == "b-"+name {
					return true
				}
			}
			return false
		})
		r := n.timed(t, "exec ping b by name", rt, "exec", ids["a"], "ping", "-c", "1", "-W", "10", "b-"+name)
		if r.code != 0 || !strings.Contains(r.stdout, "1 packets received") {
			t.Errorf("%s: a pings b: exit %d stdout %q stderr %q", name, r.code, r.stdout, r.stderr)
		}
		n.must(t, "rm", "-f", ids["a"], ids["b"])
	}
}

// TestNerdctlCpNeverReachesTheHostsFiles copies a file into a running box.
// nerdctl cp goes through /proc/<task pid>/root, and the task's pid is the
// VMM's: with QEMU's root left at the host's /, `nerdctl cp FILE box:PATH`
// wrote the host's PATH (and copying out read the host's files). QEMU now
// runs chrooted in an empty read-only root, so under boxlite the copy
// fails with "read-only file system" and the host's path stays absent;
// under runc it lands in the container. Verified two-sided: without the
// chroot the copy succeeds and creates the file on the host.
func TestNerdctlCpNeverReachesTheHostsFiles(t *testing.T) {
	n := startNerdctl(t)
	src := filepath.Join(shortTempDir(t), "payload.txt")
	os.WriteFile(src, []byte("copied\n"), 0o644)
	// A path that exists nowhere on the host.
	dst := fmt.Sprintf("/boxlite-cp-test-%d", os.Getpid())
	t.Cleanup(func() { os.Remove(dst) })
	for _, rt := range bothRuntimes {
		name := shortRuntime(rt)
		r, id := n.run(t, "run -d", rt, "-d", "--net", "none", testImage, "sleep", "600")
		if r.code != 0 || id == "" {
			t.Fatalf("%s: run -d: exit %d stderr %q", name, r.code, r.stderr)
		}
		r = n.timed(t, "cp into the box", rt, "cp", src, id+":"+dst)
		if _, err := os.Stat(dst); err == nil {
			os.Remove(dst)
			t.Errorf("%s: nerdctl cp wrote %s on the host", name, dst)
		}
		switch rt {
		case runcRuntime:
			if r.code != 0 {
				t.Errorf("runc: cp: exit %d stderr %q", r.code, r.stderr)
			} else if out := n.must(t, "exec", id, "cat", dst); out != "copied\n" {
				t.Errorf("runc: the box has %q at %s", out, dst)
			}
		default:
			if r.code == 0 || !strings.Contains(strings.ToLower(r.stderr), "read-only") {
				t.Errorf("%s: cp: exit %d stderr %q, want it refused as read-only", name, r.code, r.stderr)
			}
		}
		if r := n.timed(t, "rm -f (running)", rt, "rm", "-f", id); r.code != 0 {
			t.Errorf("%s: rm -f: exit %d stderr %q", name, r.code, r.stderr)
		}
	}
}
