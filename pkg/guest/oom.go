package guest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/log"
)

// oomCounter follows the oom_kill counter of one container's cgroup
// (memory.events) and reports each increase once.
//
// Both the inotify watcher and the exit path call check, under mu: so an OOM
// kill is always reported before the exit of the process it killed, whichever
// of the two notices it first.
type oomCounter struct {
	// path is the cgroup's memory.events file.
	path string
	// report is called, under mu, when oom_kill grew.
	report func(count uint64)

	// mu serialises check.
	mu sync.Mutex
	// seen is the last oom_kill count read. Guarded by mu.
	seen uint64
}

// newOOMCounter returns a counter of the memory.events file at path,
// starting from its current value.
func newOOMCounter(path string, report func(count uint64)) *oomCounter {
	c := &oomCounter{path: path, report: report}
	c.seen, _ = readOOMKills(path)
	return c
}

// check re-reads the counter, reports an increase, and returns the count.
func (c *oomCounter) check() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, err := readOOMKills(c.path)
	if err != nil {
		// A deleted cgroup has no more OOM kills to tell.
		if !errors.Is(err, fs.ErrNotExist) {
			log.L.WithError(err).WithField("path", c.path).Debug("read memory.events")
		}
		return c.seen
	}
	if n > c.seen {
		c.seen = n
		c.report(n)
	}
	return c.seen
}

// count returns the last count read.
func (c *oomCounter) count() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen
}

// readOOMKills returns the oom_kill counter of a memory.events file.
func readOOMKills(path string) (uint64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, val, ok := bytes.Cut(sc.Bytes(), []byte(" "))
		if ok && string(key) == "oom_kill" {
			return strconv.ParseUint(string(bytes.TrimSpace(val)), 10, 64)
		}
	}
	return 0, nil
}

// watch follows c's memory.events until stop is called: kernfs wakes the
// pollers of a cgroup file when it changes, so the netpoller (epoll, edge
// triggered) reports each change as readability and check runs once per
// change, with no inotify (the guest kernel has none) and no polling loop.
// A file the netpoller cannot watch returns an error; exits still check.
func (c *oomCounter) watch() (stop func(), err error) {
	f, err := os.Open(c.path)
	if err != nil {
		return nil, err
	}
	// Only a file the netpoller registered supports deadlines.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("watch %s: %w", c.path, err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Read returns only when the file is closed.
		_ = rc.Read(func(uintptr) bool {
			c.check()
			return false
		})
	}()
	return func() {
		f.Close()
		<-done
	}, nil
}
