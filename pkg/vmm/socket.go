package vmm

import (
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// listenUnix binds a listening unix socket at path, replacing a stale
// socket, and returns it as a file to hand to the monitor.
func listenUnix(path string) (*os.File, error) {
	if len(path) >= sunPathMax {
		return nil, invalid("socket path %s is %d bytes: unix sockets allow %d", path, len(path), sunPathMax-1)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", path, os.NewSyscallError("bind", err))
	}
	// Only our own user may connect (the QMP socket controls the VM),
	// whatever the umask and the directory's mode.
	if err := os.Chmod(path, 0o600); err != nil {
		unix.Close(fd)
		os.Remove(path)
		return nil, err
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		os.Remove(path)
		return nil, fmt.Errorf("listen %s: %w", path, os.NewSyscallError("listen", err))
	}
	return os.NewFile(uintptr(fd), path), nil
}
