package logfile

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// watchEvents are the changes of a followed log that wake its reader.
const watchEvents = unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

// aLongTimeAgo is a read deadline that has passed: it makes a blocked
// read return at once.
var aLongTimeAgo = time.Unix(1, 0)

// watcher wakes a follower when the log it reads changes: an inotify
// instance watching the log, read through the netpoller so that a read
// deadline unblocks a wait.
type watcher struct {
	// in is the inotify instance (non-blocking, close-on-exec).
	in *os.File
}

// newWatcher watches the file f has open. The watch goes through f's
// /proc/self/fd link, so it is on the file opened even if its path names
// another one by now.
func newWatcher(f *os.File) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	var watchErr error
	err = rc.Control(func(target uintptr) {
		_, watchErr = unix.InotifyAddWatch(fd, "/proc/self/fd/"+strconv.Itoa(int(target)), watchEvents)
	})
	if err == nil && watchErr != nil {
		err = os.NewSyscallError("inotify_add_watch", watchErr)
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &watcher{in: os.NewFile(uintptr(fd), "inotify")}, nil
}

// interruptOn makes a wait under way, and every later one, return as soon
// as ctx is done or done is closed. The stop it returns ends that and
// returns once nothing refers to w any more; call it before close.
func (w *watcher) interruptOn(ctx context.Context, done <-chan struct{}) (stop func()) {
	quit, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		select {
		case <-ctx.Done():
		case <-done:
		case <-quit:
			return
		}
		w.in.SetReadDeadline(aLongTimeAgo)
	}()
	return func() {
		close(quit)
		<-exited
	}
}

// wait blocks until the log changed since the last wait (a write, the
// writer's close, a rename), or until it is interrupted (interruptOn):
// that returns no error, and the caller looks at why. gone is true if the
// watch was removed (the file was deleted or its file system unmounted):
// no change will wake a wait any more.
func (w *watcher) wait() (gone bool, err error) {
	// Room for many events: a file's events carry no name.
	var buf [4096]byte
	n, err := w.in.Read(buf[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read inotify events: %w", err)
	}
	for off := 0; off+unix.SizeofInotifyEvent <= n; {
		// struct inotify_event: wd, mask, cookie, len, then name.
		mask := binary.NativeEndian.Uint32(buf[off+4:])
		nameLen := binary.NativeEndian.Uint32(buf[off+12:])
		if mask&unix.IN_IGNORED != 0 {
			gone = true
		}
		off += unix.SizeofInotifyEvent + int(nameLen)
	}
	return gone, nil
}

// close releases the inotify instance.
func (w *watcher) close() error { return w.in.Close() }
