package image

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// The store's locks are flock(2)s on files in its root, so they hold
// between processes and, since each acquisition opens its own descriptor,
// between goroutines of one process too. They are always taken in this
// order: gcLock, ingestLock, indexLock.
const (
	// gcLock is held shared by everything that uses content or layers
	// (Pull, Load, Mount) and exclusively by garbage collection, which
	// therefore never deletes what an operation in flight is writing or
	// reading.
	gcLock = "gc.lock"
	// ingestLock is held exclusively while writing the content store:
	// containerd's local store locks an ingest only within one process.
	ingestLock = "ingest.lock"
	// indexLock is held exclusively around every read-modify-write of
	// index.json. Readers need no lock: the file is replaced by rename.
	indexLock = "index.lock"
)

// Lock kinds of lockFile.
const (
	lockSh = unix.LOCK_SH
	lockEx = unix.LOCK_EX
)

// lockFile takes a flock of kind how (unix.LOCK_SH or unix.LOCK_EX) on
// path, waiting until it is granted or ctx is done. The returned function
// releases it.
func lockFile(ctx context.Context, path string, how int) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	unlock := func() { f.Close() }
	fd := int(f.Fd())
	err = flock(fd, how|unix.LOCK_NB)
	if err == nil {
		return unlock, nil
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// Wait in a goroutine so that ctx can end the wait; if it does, the
	// goroutine still owns the descriptor and closes it once the blocking
	// flock returns.
	done := make(chan error, 1)
	go func() { done <- flock(fd, how) }()
	select {
	case err := <-done:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		return unlock, nil
	case <-ctx.Done():
		go func() {
			<-done
			f.Close()
		}()
		return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
	}
}

// tryLockFile takes an exclusive flock on path if nobody holds a lock on
// it; ok is false if someone does.
func tryLockFile(path string) (unlock func(), ok bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, false, err
	}
	err = flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, false, nil
	}
	if err != nil {
		f.Close()
		return nil, false, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, true, nil
}

// flock is flock(2), retried on EINTR.
func flock(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if !errors.Is(err, unix.EINTR) {
			return os.NewSyscallError("flock", err)
		}
	}
}
