package vmm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// cgroupRoot is where the host's cgroup hierarchies are mounted; tests point
// it elsewhere.
var cgroupRoot = "/sys/fs/cgroup"

// oomCounter reads the host's count of OOM kills in the memory cgroups a
// process was in while it ran. The kernel's OOM killer kills with SIGKILL,
// as anyone can: a monitor that died of SIGKILL while one of these counts
// went up was (with the rare exception of a coincident kill in the same
// cgroup) killed for memory, which the shim must report as an OOM
// (kata #4419), not as an ordinary death. The kernel counts a kill in the
// victim's own cgroup, so a VMM alone in its cgroup (Config.Cgroup) leaves
// no room for a coincidence.
type oomCounter struct {
	mu sync.Mutex
	// counts are the cgroups counted, first the one the process started
	// in, then any it was moved to (follow).
	counts []oomCount
}

// oomCount is one cgroup's count.
type oomCount struct {
	// path is memory.oom_control (cgroup v1) or memory.events (v2).
	path string
	// base is the count when counting began.
	base uint64
}

// newOOMCounter returns a counter for pid's memory cgroup, or nil with the
// reason when the host does not expose one (no memory controller, or its
// files are not visible here).
func newOOMCounter(pid int) (*oomCounter, error) {
	path, err := pidMemoryEventsPath(pid)
	if err != nil {
		return nil, err
	}
	return newOOMCounterAt(path)
}

// newOOMCounterAt returns a counter of the cgroup whose memory.oom_control
// or memory.events is path.
func newOOMCounterAt(path string) (*oomCounter, error) {
	c := &oomCounter{}
	if _, err := c.add(path); err != nil {
		return nil, err
	}
	return c, nil
}

func pidMemoryEventsPath(pid int) (string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	return memoryEventsPath(data)
}

// add starts counting the cgroup of path, unless it is counted already,
// and says whether it was new.
func (c *oomCounter) add(path string) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.counts {
		if n.path == path {
			return false, nil
		}
	}
	base, err := readOOMKill(path)
	if err != nil {
		return false, err
	}
	c.counts = append(c.counts, oomCount{path: path, base: base})
	return true, nil
}

// follow counts, from now on, the memory cgroup pid is in, when it is a new
// one: someone (systemd reorganising its slices, an operator) moved the
// process, and the kernel now counts its OOM kill there.
func (c *oomCounter) follow(pid int) (moved bool, path string) {
	if c == nil {
		return false, ""
	}
	path, err := pidMemoryEventsPath(pid)
	if err != nil {
		return false, ""
	}
	added, err := c.add(path)
	return added && err == nil, path
}

// memoryEventsPath picks, from the contents of /proc/<pid>/cgroup, the file
// holding the oom_kill count: the v1 memory controller's memory.oom_control
// when memory is a v1 controller, else the v2 group's memory.events.
func memoryEventsPath(procCgroup []byte) (string, error) {
	var unified string
	haveUnified := false
	for _, line := range strings.Split(string(procCgroup), "\n") {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			unified, haveUnified = parts[2], true
			continue
		}
		for _, ctrl := range strings.Split(parts[1], ",") {
			if ctrl == "memory" {
				return filepath.Join(cgroupRoot, parts[1], parts[2], "memory.oom_control"), nil
			}
		}
	}
	if !haveUnified {
		return "", fmt.Errorf("no memory cgroup in /proc/<pid>/cgroup")
	}
	path := filepath.Join(cgroupRoot, unified, "memory.events")
	if _, err := os.Stat(path); err != nil {
		// A hybrid host mounts v2 elsewhere, without the memory controller.
		return "", fmt.Errorf("cgroup v2 memory controller: %w", err)
	}
	return path, nil
}

// readOOMKill returns the oom_kill count in path.
func readOOMKill(path string) (uint64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return parseOOMKill(data)
}

// parseOOMKill finds the "oom_kill N" line of memory.oom_control or
// memory.events.
func parseOOMKill(data []byte) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), " ")
		if ok && key == "oom_kill" {
			return strconv.ParseUint(strings.TrimSpace(val), 10, 64)
		}
	}
	return 0, fmt.Errorf("no oom_kill count (kernel older than 4.13?)")
}

// increased reports whether an OOM kill happened in one of the cgroups
// since it was counted. An unreadable count (the cgroup was removed) is
// false.
func (c *oomCounter) increased() bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.counts {
		if v, err := readOOMKill(n.path); err == nil && v > n.base {
			return true
		}
	}
	return false
}
