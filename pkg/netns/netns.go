// Package netns opens and creates network namespaces and runs code inside
// one. A namespace is held as an open file of nsfs: it lives at least as
// long as the file is open, so a namespace this package creates needs no
// bind mount and cannot outlive its holders.
//
// Code that enters a namespace runs on a dedicated goroutine locked to its
// OS thread, which is moved back before it is unlocked. If the move back
// fails, the thread stays locked and ends with the goroutine, so no other
// goroutine ever runs in the wrong namespace.
package netns

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Open opens the network namespace at path (such as /var/run/netns/NAME or
// /proc/PID/ns/net). A path that is not a network namespace is an
// InvalidArgument error.
func Open(path string) (*os.File, error) {
	// O_NONBLOCK: a FIFO at path must not block the open forever.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("network namespace %s does not exist: %w", path, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", path, &os.PathError{Op: "open", Path: path, Err: err})
	}
	f := os.NewFile(uintptr(fd), path)
	typ, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		f.Close()
		return nil, fmt.Errorf("%s is not a network namespace: %w", path, errdefs.ErrInvalidArgument)
	}
	return f, nil
}

// New creates a network namespace with only a loopback interface (down) and
// returns it open. It is gone once the file is closed and no process is in
// it.
func New() (*os.File, error) {
	var ns *os.File
	err := do(nil, func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return os.NewSyscallError("unshare", err)
		}
		f, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		ns = f
		return nil
	})
	if err != nil {
		if ns != nil {
			ns.Close()
		}
		return nil, fmt.Errorf("new network namespace: %w", err)
	}
	return ns, nil
}

// Do runs fn on an OS thread inside the network namespace ns (nil: ours)
// and returns its error. fn may move the thread to other namespaces: it is
// moved back afterwards, or ends with fn's goroutine when that fails. fn
// must not start goroutines that expect to be in ns.
func Do(ns *os.File, fn func() error) error {
	return do(ns, fn)
}

// Handle returns a route netlink handle whose socket is in the namespace
// ns; it works from any thread. Route netlink is all boxlite needs (links,
// addresses, routes, neighbours, qdiscs, filters), and the guest kernel has
// no other netlink family.
func Handle(ns *os.File) (*netlink.Handle, error) {
	var h *netlink.Handle
	err := do(ns, func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", ns.Name(), err)
	}
	return h, nil
}

// do runs fn on a locked thread, entered into ns first when ns is set; the
// thread's own namespace is restored afterwards in every case (fn may have
// changed it).
func do(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer orig.Close()
		if ns != nil {
			if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
				runtime.UnlockOSThread()
				errc <- fmt.Errorf("enter network namespace %s: %w", ns.Name(), os.NewSyscallError("setns", err))
				return
			}
		}
		err = fn()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			// Stay locked: the thread ends with this goroutine.
			errc <- errors.Join(err, fmt.Errorf("restore network namespace: %w", os.NewSyscallError("setns", rerr)))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}
