// Package share builds the one directory a box shares with its VM over 9p.
//
// A microvm cannot hot-plug devices, and a 9p share can be mounted once in
// the guest, so everything a box's containers need from the host goes
// through one share: a small tmpfs, private to the host's mount namespace,
// under which each container's rootfs and the sources of its bind mounts
// (volumes, CRI's and nerdctl's /etc/hosts, resolv.conf, hostname) are
// bind-mounted. 9p follows those bind mounts, and QEMU's multidevs=remap
// keeps their inode numbers apart. Removing the share unmounts the whole
// tree at once, which is also how the shim's delete action cleans up after
// a shim that was killed.
package share

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// tmpfsOptions size the share's own tmpfs: it holds only directories and
// empty files that bind mounts cover.
const tmpfsOptions = "mode=0755,size=1m,nr_inodes=16384"

// Share is a box's share directory.
type Share struct {
	// dir is where the share's tmpfs is mounted.
	dir string
}

// Create mounts a fresh share at dir, replacing a stale one (left by a shim
// that was killed) first.
func Create(dir string) (*Share, error) {
	if err := Remove(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("share %s: %w", dir, err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, tmpfsOptions); err != nil {
		os.Remove(dir)
		return nil, fmt.Errorf("mount share tmpfs on %s: %w", dir, err)
	}
	// Private: the bind mounts made under it never propagate to other
	// mount namespaces, and none arrive here from them.
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		Remove(dir)
		return nil, fmt.Errorf("make share %s private: %w", dir, err)
	}
	return &Share{dir: dir}, nil
}

// Dir is the share's host directory.
func (s *Share) Dir() string { return s.dir }

// Bind is one host path bound into the share.
type Bind struct {
	// Source is the host file or directory.
	Source string
	// Path is where it appears, relative to the share.
	Path string
	// Recursive binds the submounts of Source too (rbind).
	Recursive bool
	// ReadOnly makes the bind read-only on the host side too, so nothing
	// that reaches the share (the guest, QEMU) can write through it. Only
	// the bind itself: submounts a recursive bind brings keep their own
	// flags, as runc's "ro" leaves them.
	ReadOnly bool
	// Slave keeps receiving what is mounted under Source later (a slave of
	// its peer group, for rslave and rshared volumes): the guest then sees
	// it too. Without it the bind is private.
	Slave bool
}

// Add binds b.Source at b.Path in the share. The source must be a
// directory or a regular file, not under /proc or /sys (after symlinks are
// resolved): a host's kernel interfaces are not a box's to see.
func (s *Share) Add(b Bind) error {
	if !filepath.IsLocal(b.Path) {
		return fmt.Errorf("share path %q is not a relative path inside the share: %w", b.Path, errdefs.ErrInvalidArgument)
	}
	src, isDir, err := checkSource(b.Source)
	if err != nil {
		return err
	}
	target := filepath.Join(s.dir, b.Path)
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return fmt.Errorf("share %s: %w", target, err)
	}
	if isDir {
		err = os.Mkdir(target, 0o755)
	} else {
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
			err = f.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("share %s: %w", target, err)
	}
	flags := uintptr(unix.MS_BIND)
	if b.Recursive {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(src, target, "", flags, ""); err != nil {
		return fmt.Errorf("bind %s into the share: %w", src, err)
	}
	// A bind of a source on a shared mount joins the source's peer group:
	// private like the share, nothing mounted under the source later
	// reaches the share and nothing bound inside it reaches the source; a
	// slave still receives the source's new mounts but sends nothing back.
	prop, how := uintptr(unix.MS_PRIVATE), "private"
	if b.Slave {
		prop, how = unix.MS_SLAVE, "a slave"
	}
	if err := unix.Mount("", target, "", prop|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make the bind of %s %s: %w", src, how, err)
	}
	if b.ReadOnly {
		if err := readOnly(target); err != nil {
			return fmt.Errorf("make %s read-only in the share: %w", src, err)
		}
	}
	return nil
}

// checkSource resolves a bind source and says whether it is a directory.
func checkSource(source string) (string, bool, error) {
	if !filepath.IsAbs(source) {
		return "", false, fmt.Errorf("bind source %q is not an absolute path: %w", source, errdefs.ErrInvalidArgument)
	}
	src, err := filepath.EvalSymlinks(source)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, fmt.Errorf("bind source %s does not exist: %w", source, errdefs.ErrNotFound)
	}
	if err != nil {
		return "", false, fmt.Errorf("bind source %s: %w", source, err)
	}
	for _, kernel := range []string{"/proc", "/sys"} {
		if src == kernel || strings.HasPrefix(src, kernel+"/") {
			return "", false, fmt.Errorf("bind source %s is under the host's %s, which a box cannot share: %w", source, kernel, errdefs.ErrInvalidArgument)
		}
	}
	st, err := os.Stat(src)
	if err != nil {
		return "", false, fmt.Errorf("bind source %s: %w", source, err)
	}
	switch {
	case st.IsDir():
		return src, true, nil
	case st.Mode().IsRegular():
		return src, false, nil
	}
	return "", false, fmt.Errorf("bind source %s is a %s: only files and directories can be shared with a VM: %w",
		source, fileKind(st.Mode()), errdefs.ErrInvalidArgument)
}

func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// readOnly makes the mount at target read-only (not its submounts).
func readOnly(target string) error {
	return unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
}

// Remove unmounts the share at dir with everything bound under it and
// removes the directory. A missing share is not an error. It never removes
// anything recursively: while a bind mount remains, a recursive removal
// would delete the host's files through it. Callers must not remove a
// directory holding the share either unless Remove succeeded.
func Remove(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := mount.UnmountRecursive(dir, 0); err != nil {
		return fmt.Errorf("unmount share %s: %w", dir, err)
	}
	// Unmounted, the tmpfs's files are gone and dir is empty.
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove share %s: %w", dir, err)
	}
	return nil
}

// Unbind unmounts everything bound at or under path (relative to the share)
// and removes what Add made there, leaving the rest of the share as it is:
// a container that leaves a running pod takes its files out of the share.
// Nothing is removed while anything is still mounted there.
func (s *Share) Unbind(path string) error {
	if !filepath.IsLocal(path) {
		return fmt.Errorf("share path %q is not a relative path inside the share: %w", path, errdefs.ErrInvalidArgument)
	}
	target := filepath.Join(s.dir, path)
	if _, err := os.Lstat(target); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := mount.UnmountRecursive(target, 0); err != nil {
		return fmt.Errorf("unmount %s in the share: %w", path, err)
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(target))
	if err != nil {
		return fmt.Errorf("check mounts under %s: %w", target, err)
	}
	if len(infos) > 0 {
		return fmt.Errorf("%s is still mounted in the share after unmounting it: %w", infos[0].Mountpoint, errdefs.ErrFailedPrecondition)
	}
	// Only the share's own tmpfs is left there: its empty directories and
	// files, which covered the binds.
	if err := os.RemoveAll(target); err != nil {
		return fmt.Errorf("remove %s from the share: %w", path, err)
	}
	return nil
}
