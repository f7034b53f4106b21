// Package netnstest makes network namespaces for tests and checks that
// they are released: once a test has closed a namespace, no thread or
// descriptor of the test process may still refer to it, so that the kernel
// destroys it and every interface in it.
package netnstest

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/poll"
	"github.com/boxlite/boxlite/pkg/netns"
)

// ID names a network namespace: the device and inode of its nsfs file.
type ID struct {
	// Dev is the device of the nsfs file.
	Dev uint64
	// Ino is its inode, the N of "net:[N]".
	Ino uint64
}

// String returns the name the kernel shows for the namespace, "net:[N]".
func (id ID) String() string { return fmt.Sprintf("net:[%d]", id.Ino) }

// FileID returns the namespace f is.
func FileID(t testing.TB, f *os.File) ID {
	t.Helper()
	return fdID(t, int(f.Fd()), f.Name())
}

// fdID returns the namespace the descriptor fd is; name names fd in a
// failure.
func fdID(t testing.TB, fd int, name string) ID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("fstat %s: %v", name, err)
	}
	return ID{st.Dev, st.Ino}
}

// Refs lists the threads of this process that are in the namespace id and
// the descriptors of this process that refer to it, as /proc paths.
func Refs(id ID) []string {
	tasks, _ := filepath.Glob("/proc/self/task/*/ns/net")
	fds, _ := filepath.Glob("/proc/self/fd/*")
	var refs []string
	for _, p := range append(tasks, fds...) {
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && (ID{st.Dev, st.Ino}) == id {
			refs = append(refs, p)
		}
	}
	return refs
}

// WaitReleased fails the test (t.Errorf) unless, within poll.Timeout,
// nothing of this process refers to the namespace id (see Refs).
func WaitReleased(t testing.TB, id ID) {
	t.Helper()
	err := poll.Wait(func() error {
		if refs := Refs(id); len(refs) > 0 {
			return fmt.Errorf("still referred to by %v", refs)
		}
		return nil
	})
	if err != nil {
		t.Errorf("leak: namespace %v %v", id, err)
	}
}

// Release makes the test, when it ends, call closeNS and then wait for the
// namespace fd is to be released (WaitReleased). closeNS must close fd: it
// gives up the test's own reference. For a namespace New did not make.
func Release(t testing.TB, fd int, closeNS func() error) {
	t.Helper()
	id := fdID(t, fd, fmt.Sprintf("descriptor %d", fd))
	t.Cleanup(func() {
		closeNS()
		WaitReleased(t, id)
	})
}

// New returns a new network namespace, made by netns.New with only a
// loopback interface. When the test ends it is closed and must then be
// released (see Release).
func New(t testing.TB) *os.File {
	t.Helper()
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	Release(t, int(ns.Fd()), ns.Close)
	return ns
}

// Handle returns a netlink handle whose sockets are in ns, closed when the
// test ends (before ns, if ns is of New or Release and was made first).
func Handle(t testing.TB, ns *os.File) *netlink.Handle {
	t.Helper()
	h, err := netns.Handle(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// LinkNames lists, sorted, the names of the interfaces seen through h that
// begin with prefix ("" for all of them).
func LinkNames(t testing.TB, h *netlink.Handle, prefix string) []string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatalf("list interfaces: %v", err)
	}
	var names []string
	for _, l := range links {
		if name := l.Attrs().Name; strings.HasPrefix(name, prefix) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}
