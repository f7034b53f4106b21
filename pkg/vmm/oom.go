package vmm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// cgroupRoot is where the host's cgroup hierarchies are mounted; tests point
// it elsewhere.
var cgroupRoot = "/sys/fs/cgroup"

// oomCounter reads the host's count of OOM kills in the memory cgroup a
// process was in when it was created. The kernel's OOM killer kills with
// SIGKILL, as anyone can: a monitor that died of SIGKILL while this count
// went up was (with the rare exception of a coincident kill in the same
// cgroup) killed for memory, which the shim must report as an OOM
// (kata #4419), not as an ordinary death.
type oomCounter struct {
	// path is memory.oom_control (cgroup v1) or memory.events (v2).
	path string
	// base is the count when the counter was made.
	base uint64
}

// newOOMCounter returns a counter for pid's memory cgroup, or nil with the
// reason when the host does not expose one (no memory controller, or its
// files are not visible here).
func newOOMCounter(pid int) (*oomCounter, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, err
	}
	path, err := memoryEventsPath(data)
	if err != nil {
		return nil, err
	}
	c := &oomCounter{path: path}
	if c.base, err = c.read(); err != nil {
		return nil, err
	}
	return c, nil
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

// read returns the current oom_kill count.
func (c *oomCounter) read() (uint64, error) {
	data, err := os.ReadFile(c.path)
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

// increased reports whether an OOM kill happened in the cgroup since the
// counter was made. An unreadable count (the cgroup was removed) is false.
func (c *oomCounter) increased() bool {
	if c == nil {
		return false
	}
	n, err := c.read()
	return err == nil && n > c.base
}
