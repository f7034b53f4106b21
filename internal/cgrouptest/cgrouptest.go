// Package cgrouptest makes throwaway cgroups for tests that move processes
// into one (containerd's ShimCgroup), on a cgroup v2 host or in every v1
// hierarchy of a v1 or hybrid one.
package cgrouptest

import (
	"crypto/rand"
	"encoding/hex"
	"testing"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// New makes an empty cgroup named after prefix and returns its path
// (relative to the cgroup root). It is removed when the test ends, by a
// cleanup registered now: whatever the test moved into it must be gone by
// then, so register that cleanup after calling New.
func New(t testing.TB, prefix string) string {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	path := "/" + prefix + "-" + hex.EncodeToString(b)
	var remove func() error
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, &cgroup2.Resources{})
		if err != nil {
			t.Fatalf("make cgroup %s: %v", path, err)
		}
		remove = m.Delete
	} else {
		cg, err := cgroup1.New(cgroup1.StaticPath(path), &specs.LinuxResources{})
		if err != nil {
			t.Fatalf("make cgroup %s: %v", path, err)
		}
		remove = cg.Delete
	}
	t.Cleanup(func() {
		if err := remove(); err != nil {
			t.Errorf("remove cgroup %s: %v", path, err)
		}
	})
	return path
}
