package integration

// Leak attribution and assertions for the containerd tests: which processes,
// mounts and shim state directories a test's daemon left behind.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// procInfo is one process as /proc shows it.
type procInfo struct {
	pid, ppid   int
	state, comm string
	cmdline     string
}

func (p procInfo) String() string {
	return fmt.Sprintf("pid %d ppid %d state %s comm %s cmdline %q", p.pid, p.ppid, p.state, p.comm, p.cmdline)
}

// listProcs reads every process in /proc.
func listProcs() []procInfo {
	entries, _ := os.ReadDir("/proc")
	var ps []procInfo
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		open, end := bytes.IndexByte(data, '('), bytes.LastIndexByte(data, ')')
		if open < 0 || end < open {
			continue
		}
		f := strings.Fields(string(data[end+1:]))
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		ps = append(ps, procInfo{pid: pid, ppid: ppid, state: f[0], comm: string(data[open+1 : end]),
			cmdline: strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))})
	}
	return ps
}

// descendants returns the processes below root.
func descendants(root int, ps []procInfo) []procInfo {
	kids := map[int][]procInfo{}
	for _, p := range ps {
		kids[p.ppid] = append(kids[p.ppid], p)
	}
	var out []procInfo
	queue := []int{root}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, k := range kids[pid] {
			out = append(out, k)
			queue = append(queue, k.pid)
		}
	}
	return out
}

// strays are the processes this test's daemon caused that are still there:
// every descendant of the test process except the daemon itself, and any
// process naming the daemon's directory or a box's shim state directory on
// its command line (a shim or a QEMU reparented elsewhere).
func (c *containerd) strays() []procInfo {
	ps := listProcs()
	daemon := c.pid()
	seen := map[int]bool{}
	var out []procInfo
	add := func(p procInfo) {
		if p.pid == daemon || seen[p.pid] {
			return
		}
		seen[p.pid] = true
		out = append(out, p)
	}
	for _, p := range descendants(os.Getpid(), ps) {
		add(p)
	}
	// QEMU names its box's share, in the shim's state directory.
	stateDirs := c.shimStateDirs()
	for _, p := range ps {
		if strings.Contains(p.cmdline, c.dir) {
			add(p)
		}
		for d := range stateDirs {
			if strings.Contains(p.cmdline, d+"/") {
				add(p)
			}
		}
	}
	return out
}

// shims returns the live boxlite shims of this daemon (by their -address).
func (c *containerd) shims() []procInfo {
	var out []procInfo
	for _, p := range c.strays() {
		if strings.Contains(p.cmdline, shimBinary) && strings.Contains(p.cmdline, c.addr) {
			out = append(out, p)
		}
	}
	return out
}

// shimOf returns the pid of the long-lived shim serving id.
func (c *containerd) shimOf(t testing.TB, id string) int {
	t.Helper()
	for _, p := range c.shims() {
		if strings.Contains(" "+p.cmdline+" ", " -id "+id+" ") && !strings.HasSuffix(p.cmdline, " start") && p.state != "Z" {
			return p.pid
		}
	}
	t.Fatalf("no shim found for %s", id)
	return 0
}

// assertNoLeaks waits (bounded) for every shim and QEMU of the test to be
// gone, stops the daemon, then fails the test for anything left: a process
// (zombies included), a mount under the test's directory, or a shim state
// directory of one of the test's boxes. Leftovers are killed by pid so the
// next test starts clean.
func (c *containerd) assertNoLeaks(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for len(c.strays()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if s := c.strays(); len(s) > 0 {
		var desc []string
		for _, p := range s {
			desc = append(desc, p.String())
		}
		t.Errorf("leak: %d process(es) left %v after the test (containerd still running):\n%s",
			len(s), settleTimeout, strings.Join(desc, "\n"))
	}
	c.stop(t)
	// The daemon is gone: whatever is left is a leak. Give reparented
	// zombies a moment to be reaped by our reaper.
	deadline = time.Now().Add(2 * time.Second)
	for len(c.strays()) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if s := c.strays(); len(s) > 0 {
		var desc []string
		for _, p := range s {
			desc = append(desc, p.String())
			syscall.Kill(p.pid, syscall.SIGKILL)
		}
		t.Errorf("leak: %d process(es) left after containerd stopped (killed now):\n%s", len(s), strings.Join(desc, "\n"))
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, c.dir) {
			t.Errorf("leak: mount left under %s: %s", c.dir, line)
			if f := strings.Fields(line); len(f) > 4 {
				syscall.Unmount(f[4], syscall.MNT_DETACH)
			}
		}
	}
	dirs := c.shimStateDirs()
	assertNoVMMCgroups(t, func(cg string) bool {
		for d := range dirs {
			if vmmCgroupOf(cg, d) {
				return true
			}
		}
		return false
	})
	for d, of := range dirs {
		if dirExists(d) {
			t.Errorf("leak: shim state directory %s of %s left (removed now)", d, of)
			// Its mounts (the share, QEMU's root) go first, deepest
			// first, or RemoveAll stops at them.
			m := mountedUnder(d)
			for i := len(m) - 1; i >= 0; i-- {
				syscall.Unmount(m[i], syscall.MNT_DETACH)
			}
			os.RemoveAll(d)
		}
	}
}

// shimStateDirs maps the shim state directory of every container the test
// used (through ctr or the Go client, and through CRI) to its
// "namespace/id".
func (c *containerd) shimStateDirs() map[string]string {
	dirs := map[string]string{}
	for _, id := range c.ids {
		dirs[shimStateDir(testNamespace, id)] = testNamespace + "/" + id
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range c.criIDs {
		dirs[shimStateDir(criNamespace, id)] = criNamespace + "/" + id
	}
	return dirs
}

// shimStateDir mirrors pkg/shim's boxStateDir.
func shimStateDir(ns, id string) string {
	sum := sha256.Sum256([]byte(ns + "/" + id))
	return filepath.Join(shimStateRoot, hex.EncodeToString(sum[:8]))
}

func dirExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// pidGone waits (bounded) until pid is no longer in /proc, zombie included,
// and fails with its status otherwise.
func pidGone(t testing.TB, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s pid %d still present after %v:\n%s", what, pid, settleTimeout, statusLines(status))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
