package guest

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// maxEntropy bounds the host entropy one ping carries.
const maxEntropy = 256

// errNotReseeded is Create's answer before the host reseeded the guest.
var errNotReseeded = fmt.Errorf("the guest's random number generator was not reseeded by the host since it booted or was restored from a template: no container runs before: %w", errdefs.ErrFailedPrecondition)

// WithReseedRequired makes Create refuse until a ping with host entropy
// reseeded the guest's random number generator (the real guest's setting:
// a VM restored from a template starts with the template's generator state,
// the same in every clone).
func WithReseedRequired() Option {
	return func(c *config) error {
		c.reseedRequired = true
		return nil
	}
}

// reseed credits b to the kernel's entropy pool (RNDADDENTROPY) and forces
// the CRNG to reseed from it (RNDRESEEDCRNG), so that everything read from
// /dev/urandom, getrandom() and the kernel's own users from now on differs
// from every other clone of the same template.
func reseed(b []byte) error {
	if len(b) == 0 || len(b) > maxEntropy {
		return fmt.Errorf("host entropy of %d bytes: want 1 to %d: %w", len(b), maxEntropy, errdefs.ErrInvalidArgument)
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+(len(b)+3)/4*4)
	binary.NativeEndian.PutUint32(info[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}
