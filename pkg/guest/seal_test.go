package guest

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// inMountNS runs fn on a thread of its own in a private mount namespace.
// The thread is never unlocked, so it ends with fn and takes the namespace
// and every mount fn made with it.
func inMountNS(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root: run go test as root")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			t.Errorf("unshare the mount namespace: %v", err)
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			t.Errorf("make mounts private: %v", err)
			return
		}
		fn()
	}()
	<-done
}

// The runtime's binary starts on tmpfs, as in the initramfs. Reverting
// sealBinary to a no-op fails every check below but the content.
func TestSealBinaryPutsTheRuntimeOnAReadOnlyNonTmpfsMount(t *testing.T) {
	dir := t.TempDir()
	content := bytes.Repeat([]byte("crun\x00"), 100_000)
	inMountNS(t, func() {
		root := filepath.Join(dir, "root")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Error(err)
			return
		}
		if err := unix.Mount("tmpfs", root, "tmpfs", 0, ""); err != nil {
			t.Errorf("mount tmpfs: %v", err)
			return
		}
		bin := filepath.Join(root, "crun")
		if err := os.WriteFile(bin, content, 0o755); err != nil {
			t.Error(err)
			return
		}
		if err := sealBinary(bin, filepath.Join(dir, "sealed")); err != nil {
			t.Errorf("sealBinary: %v", err)
			return
		}
		if got, err := os.ReadFile(bin); err != nil || !bytes.Equal(got, content) {
			t.Errorf("the sealed binary reads %d bytes (%v), want the original %d", len(got), err, len(content))
		}
		if fi, err := os.Stat(bin); err != nil || fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("the sealed binary is not executable: %v %v", fi.Mode(), err)
		}
		f, err := os.Open(bin)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		// crun's test: F_GET_SEALS must fail (tmpfs answers it for any
		// file), then fstatfs must say read-only.
		if seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0); !errors.Is(err, unix.EINVAL) {
			t.Errorf("F_GET_SEALS = %d, %v; want EINVAL (not on tmpfs)", seals, err)
		}
		var st unix.Statfs_t
		if err := unix.Fstatfs(int(f.Fd()), &st); err != nil || st.Flags&unix.ST_RDONLY == 0 {
			t.Errorf("statfs flags %#x (%v): want ST_RDONLY", st.Flags, err)
		}
		if w, err := os.OpenFile(bin, os.O_WRONLY, 0); !errors.Is(err, unix.EROFS) {
			if w != nil {
				w.Close()
			}
			t.Errorf("open for writing: %v, want EROFS", err)
		}
	})
}

func TestSealBinaryOfAMissingFileLeavesNoMount(t *testing.T) {
	dir := t.TempDir()
	inMountNS(t, func() {
		sealed := filepath.Join(dir, "sealed")
		err := sealBinary(filepath.Join(dir, "missing"), sealed)
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("sealBinary of a missing file: %v, want ErrNotExist", err)
		}
		mounts, err := os.ReadFile("/proc/thread-self/mountinfo")
		if err != nil {
			t.Error(err)
			return
		}
		if strings.Contains(string(mounts), " "+sealed+" ") {
			t.Errorf("a failed seal left %s mounted", sealed)
		}
	})
}
