package errclass

import (
	"errors"
	"io/fs"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
)

func TestErrorsKeepTheirMessageAndMatchTheirClass(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		msg   string
		cause error
	}{
		{"no cause", Errorf(errdefs.ErrNotFound, "no such box: %s", "b1"), "no such box: b1", nil},
		{"a %w cause", Errorf(errdefs.ErrInvalidArgument, "rootfs: %w", fs.ErrNotExist), "rootfs: file does not exist", fs.ErrNotExist},
		{"wrapped", Wrap(errdefs.ErrNotFound, fs.ErrNotExist), "file does not exist", fs.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.err.Error() != tc.msg {
				t.Errorf("message %q, want %q", tc.err.Error(), tc.msg)
			}
			if tc.cause != nil && !errors.Is(tc.err, tc.cause) {
				t.Errorf("%v does not match its cause", tc.err)
			}
			// Across the wire and back, the class stays; a nil cause
			// must not panic errgrpc.
			back := errgrpc.ToNative(errgrpc.ToGRPC(tc.err))
			if errdefs.IsNotFound(tc.err) != errdefs.IsNotFound(back) || errdefs.IsInvalidArgument(tc.err) != errdefs.IsInvalidArgument(back) {
				t.Errorf("class lost on the wire: %v -> %v", tc.err, back)
			}
		})
	}
}
