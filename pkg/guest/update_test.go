package guest

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// Update refuses what it cannot apply before it looks for the container:
// garbage and oversized resources are InvalidArgument, an unknown container
// is NotFound. The runtime is never run for them (a fake one would fail).
func TestUpdateRefusesBadResourcesAndUnknownContainers(t *testing.T) {
	a, err := New(Runtime{Name: "fake"}, nil, WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, id string
		data     []byte
		is       error
		says     string
	}{
		{"not JSON", "c1", []byte("memory=1G"), errdefs.ErrInvalidArgument, "not an OCI LinuxResources"},
		{"wrong shape", "c1", []byte(`{"memory": {"limit": "lots"}}`), errdefs.ErrInvalidArgument, "not an OCI LinuxResources"},
		{"too large", "c1", []byte(`{"devices": [` + strings.Repeat(`{"allow": true},`, maxResourcesSize/16) + `{}]}`), errdefs.ErrInvalidArgument, "exceed"},
		{"unknown container", "nope", []byte(`{"pids": {"limit": 10}}`), errdefs.ErrNotFound, "nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := a.Update(t.Context(), tc.id, tc.data)
			if !errdefs.IsInvalidArgument(err) && tc.is == errdefs.ErrInvalidArgument || !errdefs.IsNotFound(err) && tc.is == errdefs.ErrNotFound {
				t.Fatalf("Update = %v, want %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("Update = %v, want it to say %q", err, tc.says)
			}
		})
	}
}
