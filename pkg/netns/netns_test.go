package netns_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
)

// requireRoot skips the test unless it may create network namespaces.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run as root")
	}
}

// statNS returns the namespace the file at path is.
func statNS(path string) (netnstest.ID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return netnstest.ID{}, err
	}
	return netnstest.ID{Dev: st.Dev, Ino: st.Ino}, nil
}

// pathNS returns the namespace the file at path is.
func pathNS(t *testing.T, path string) netnstest.ID {
	t.Helper()
	id, err := statNS(path)
	if err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return id
}

// threadNS returns the network namespace of the calling thread.
func threadNS() (netnstest.ID, error) {
	return statNS("/proc/thread-self/ns/net")
}

// strayThreads lists the threads of this process that are not in want.
func strayThreads(want netnstest.ID) []string {
	paths, _ := filepath.Glob("/proc/self/task/*/ns/net")
	var out []string
	for _, p := range paths {
		if id, err := statNS(p); err == nil && id != want {
			out = append(out, fmt.Sprintf("%s=%v", p, id))
		}
	}
	return out
}

// checkThreadsHome fails the test at its end unless every thread of this
// process is back in the namespace it had when the test began.
func checkThreadsHome(t *testing.T) netnstest.ID {
	t.Helper()
	home := pathNS(t, "/proc/self/ns/net")
	t.Cleanup(func() {
		if stray := strayThreads(home); len(stray) > 0 {
			t.Errorf("threads left outside %v: %v", home, stray)
		}
	})
	return home
}

// namedNS makes a namespace with `ip netns add` and returns its path; it is
// deleted when the test ends.
func namedNS(t *testing.T) string {
	t.Helper()
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skipf("needs the ip command (iproute2) to make a named namespace: %v", err)
	}
	name := fmt.Sprintf("blxtest-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-"))
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(ip, "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", name, err, out)
		}
	})
	return filepath.Join("/run/netns", name)
}

func TestOpenAcceptsNetworkNamespaces(t *testing.T) {
	requireRoot(t)
	checkThreadsHome(t)
	leakcheck.FDs(t)
	tests := []struct {
		name string
		// path returns the path to open and the namespace it must be.
		path func(t *testing.T) (string, netnstest.ID)
	}{
		{"made by ip netns add", func(t *testing.T) (string, netnstest.ID) {
			p := namedNS(t)
			return p, pathNS(t, p)
		}},
		{"our own", func(t *testing.T) (string, netnstest.ID) {
			return "/proc/self/ns/net", pathNS(t, "/proc/self/ns/net")
		}},
		{"made by New, through its descriptor", func(t *testing.T) (string, netnstest.ID) {
			ns := netnstest.New(t)
			return fmt.Sprintf("/proc/self/fd/%d", ns.Fd()), netnstest.FileID(t, ns)
		}},
		{"a thread's, through /proc/thread-self", func(t *testing.T) (string, netnstest.ID) {
			return "/proc/thread-self/ns/net", pathNS(t, "/proc/self/ns/net")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, want := tt.path(t)
			f, err := netns.Open(path)
			if err != nil {
				t.Fatalf("netns.Open(%s): %v", path, err)
			}
			defer f.Close()
			if got := netnstest.FileID(t, f); got != want {
				t.Errorf("netns.Open(%s) is %v, want %v", path, got, want)
			}
		})
	}
}

func TestOpenRefusesWhatIsNotANetworkNamespace(t *testing.T) {
	requireRoot(t)
	leakcheck.FDs(t)
	dir := t.TempDir()
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("not a namespace"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		is   func(error) bool
		want string
	}{
		{"regular file", regular, errdefs.IsInvalidArgument, "InvalidArgument"},
		{"directory", dir, errdefs.IsInvalidArgument, "InvalidArgument"},
		{"mount namespace", "/proc/self/ns/mnt", errdefs.IsInvalidArgument, "InvalidArgument"},
		{"missing path", filepath.Join(dir, "missing"), errdefs.IsNotFound, "NotFound"},
		{"missing directory", filepath.Join(dir, "missing", "net"), errdefs.IsNotFound, "NotFound"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := netns.Open(tt.path)
			if err == nil {
				f.Close()
				t.Fatalf("netns.Open(%s) succeeded, want %s", tt.path, tt.want)
			}
			if !tt.is(err) {
				t.Errorf("netns.Open(%s) = %v, want %s", tt.path, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.path) {
				t.Errorf("netns.Open(%s) = %q, which does not name the path", tt.path, err)
			}
		})
	}
}

func TestNewCreatesAnotherNamespaceWithOnlyLoopback(t *testing.T) {
	requireRoot(t)
	home := checkThreadsHome(t)
	leakcheck.FDs(t)
	ns := netnstest.New(t)
	id := netnstest.FileID(t, ns)
	if id == home {
		t.Fatalf("New returned our own namespace %v", home)
	}
	var ifaces []net.Interface
	err := netns.Do(ns, func() error {
		var err error
		ifaces, err = net.Interfaces()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ifaces) != 1 || ifaces[0].Name != "lo" {
		t.Fatalf("the new namespace has interfaces %v, want only lo", ifaces)
	}
	if ifaces[0].Flags&net.FlagUp != 0 {
		t.Errorf("lo is up in the new namespace, want down: %v", ifaces[0].Flags)
	}
	// Each call makes a namespace of its own.
	other := netnstest.New(t)
	if netnstest.FileID(t, other) == id {
		t.Errorf("two calls of New returned the same namespace %v", id)
	}
}

func TestNewNamespaceIsReleasedWhenItsFileIsClosed(t *testing.T) {
	requireRoot(t)
	checkThreadsHome(t)
	leakcheck.FDs(t)
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	id := netnstest.FileID(t, ns)
	ns.Close()
	// Nothing of this process holds the namespace: no descriptor and no
	// thread, so the kernel destroys it.
	for _, p := range netnstest.Refs(id) {
		t.Errorf("%s still refers to the closed namespace %v", p, id)
	}
}

func TestDoRunsFnInsideTheNamespaceAndRestoresTheThread(t *testing.T) {
	requireRoot(t)
	home := checkThreadsHome(t)
	leakcheck.FDs(t)
	ns := netnstest.New(t)
	target := netnstest.FileID(t, ns)
	errFn := errors.New("fn failed")
	tests := []struct {
		name string
		ret  error
	}{
		{"fn succeeds", nil},
		{"fn fails", errFn},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Pin the caller to its thread: Do must leave that thread
			// where it was.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var inside netnstest.ID
			err := netns.Do(ns, func() error {
				var err error
				if inside, err = threadNS(); err != nil {
					return err
				}
				return tt.ret
			})
			if !errors.Is(err, tt.ret) || (tt.ret == nil && err != nil) {
				t.Fatalf("Do = %v, want %v", err, tt.ret)
			}
			if inside != target {
				t.Errorf("fn ran in %v, want the target %v", inside, target)
			}
			after, err := threadNS()
			if err != nil {
				t.Fatal(err)
			}
			if after != home {
				t.Errorf("the caller's thread is in %v after Do, want %v", after, home)
			}
			if stray := strayThreads(home); len(stray) > 0 {
				t.Errorf("threads outside %v after Do: %v", home, stray)
			}
		})
	}
}

func TestDoRefusesAFileThatIsNotANamespace(t *testing.T) {
	requireRoot(t)
	home := checkThreadsHome(t)
	leakcheck.FDs(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ran := false
	err = netns.Do(f, func() error { ran = true; return nil })
	if err == nil {
		t.Fatal("Do with /dev/null succeeded")
	}
	if ran {
		t.Error("Do ran fn although it could not enter the namespace")
	}
	if !strings.Contains(err.Error(), os.DevNull) {
		t.Errorf("Do = %q, which does not name the file", err)
	}
	if stray := strayThreads(home); len(stray) > 0 {
		t.Errorf("threads outside %v: %v", home, stray)
	}
}

// TestDoLeavesNoThreadInAnotherNamespace runs many Do calls whose fn moves
// its thread to a namespace of its own, concurrently with goroutines that
// check, on whatever thread the scheduler gives them, that they run in the
// process's namespace: a thread that Do released without restoring it would
// be picked up by one of them.
func TestDoLeavesNoThreadInAnotherNamespace(t *testing.T) {
	requireRoot(t)
	home := checkThreadsHome(t)
	leakcheck.FDs(t)
	ns := netnstest.New(t)
	target := netnstest.FileID(t, ns)
	const iterations = 200
	var wg sync.WaitGroup
	errs := make(chan error, 3*iterations)
	for i := range iterations {
		enter := ns
		if i%2 == 1 {
			enter = nil // As New does: fn starts in our namespace.
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			err := netns.Do(enter, func() error {
				if enter != nil {
					if got, err := threadNS(); err != nil || got != target {
						return fmt.Errorf("fn ran in %v (%v), want %v", got, err, target)
					}
				}
				if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
					return os.NewSyscallError("unshare", err)
				}
				return nil
			})
			if err != nil {
				errs <- fmt.Errorf("Do %d: %w", i, err)
			}
		}()
		go func() {
			defer wg.Done()
			if got, err := threadNS(); err != nil || got != home {
				errs <- fmt.Errorf("a goroutine ran in %v (%v), want %v", got, err, home)
			}
		}()
	}
	wg.Wait()
	// And afterwards, from fresh goroutines on any thread.
	for range iterations {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := threadNS(); err != nil || got != home {
				errs <- fmt.Errorf("a goroutine ran in %v (%v) after the calls, want %v", got, err, home)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if stray := strayThreads(home); len(stray) > 0 {
		t.Errorf("threads outside %v: %v", home, stray)
	}
}
