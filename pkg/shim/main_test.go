package shim

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// testTimeout bounds every wait of these tests.
const testTimeout = 10 * time.Second

func TestMain(m *testing.M) {
	// The shim's one owner of wait, as in the shim binary: hooks and
	// binary:// loggers are started through it, and it reaps the orphans
	// they leave (it makes this process a child subreaper).
	reaper.Default()
	os.Exit(m.Run())
}

// requireRoot skips the test unless it may mount and make network
// namespaces and taps.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, network namespaces, taps): run as root")
	}
}

// testCtx returns a context that ends with the test or after d.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// checkLeaks fails the test if, when it ends, it has left more goroutines
// or open descriptors than when this was called, or any child process
// (zombies included). Call it before the test starts anything.
func checkLeaks(t *testing.T) {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
	leakcheck.Children(t)
}
