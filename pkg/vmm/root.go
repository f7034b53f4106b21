package vmm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// RootDirName is the directory in Config.StateDir that QEMU chroots into
// once it has opened its devices.
//
// The task's pid that containerd's clients see is QEMU's, and tools reach
// a running container's files through /proc/<pid>/root (nerdctl cp does):
// with QEMU's root left at the host's /, `nerdctl cp FILE box:/etc/passwd`
// would overwrite the host's /etc/passwd. Chrooted, QEMU's root is an empty
// read-only tmpfs: such a copy fails with "read-only file system" and
// nothing of the host is reachable through it (nor by QEMU itself, should
// a guest break into it). The one thing QEMU still needs there is
// /proc/self/fd (its 9p server changes modes through it), so the root
// holds a procfs with only the process directories (subset=pid): no
// /proc/sys, no /proc/sysrq-trigger.
const RootDirName = "root"

// makeRoot mounts QEMU's root at dir: an empty read-only tmpfs with a
// pid-only procfs at proc. On failure nothing is left mounted.
func makeRoot(dir string) (retErr error) {
	if err := removeRoot(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o555); err != nil {
		return fmt.Errorf("vmm root %s: %w", dir, err)
	}
	defer func() {
		if retErr != nil {
			removeRoot(dir)
		}
	}()
	const flags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	if err := unix.Mount("tmpfs", dir, "tmpfs", flags, "mode=0555,size=16k,nr_inodes=16"); err != nil {
		return fmt.Errorf("mount vmm root on %s: %w", dir, err)
	}
	// Private: nothing mounted here shows anywhere else.
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make vmm root %s private: %w", dir, err)
	}
	proc := filepath.Join(dir, "proc")
	if err := os.Mkdir(proc, 0o555); err != nil {
		return fmt.Errorf("vmm root: %w", err)
	}
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY|flags, ""); err != nil {
		return fmt.Errorf("make vmm root %s read-only: %w", dir, err)
	}
	if err := unix.Mount("proc", proc, "proc", flags, "subset=pid"); err != nil {
		return fmt.Errorf("mount procfs in the vmm root: %w", err)
	}
	return nil
}

// removeRoot unmounts QEMU's root at dir and removes the directory; a
// missing one is not an error.
func removeRoot(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount vmm root %s: %w", dir, err)
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove vmm root %s: %w", dir, err)
	}
	return nil
}
