package guest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/errdefs"
)

// inStream is the stdin of a process, written by the host by offset.
//
// Writes are serialised by a one-slot channel semaphore, so a call that waits
// behind a slow write can give up when its ctx is done. written counts the
// bytes that reached the pipe; a retried call skips them.
type inStream struct {
	// sem holds one token; whoever holds it owns w, written and closed.
	sem chan struct{}
	// w is the write end of the process's stdin pipe.
	w *os.File
	// written is the stream offset after the last byte written. Guarded by sem.
	written uint64
	// closed says w was closed. Guarded by sem.
	closed bool
	// eof, when set, ends the input instead of closing w (a terminal's
	// master must stay open).
	eof func(w *os.File) error
}

// newInStream returns the stdin stream writing to w; eof (optional) ends the
// input in place of closing w.
func newInStream(w *os.File, eof func(*os.File) error) *inStream {
	s := &inStream{sem: make(chan struct{}, 1), w: w, eof: eof}
	s.sem <- struct{}{}
	return s
}

// acquire takes the semaphore or fails when ctx is done first.
func (s *inStream) acquire(ctx context.Context) error {
	select {
	case <-s.sem:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *inStream) release() { s.sem <- struct{}{} }

// Write writes the bytes of data that are at or after the count already
// written, data[0] being at offset, and returns the new count. The pipe write
// blocks while the process does not read (backpressure); when ctx ends first,
// Write returns the count reached so far, and the host retries from there.
func (s *inStream) Write(ctx context.Context, offset uint64, data []byte) (uint64, error) {
	if len(data) > maxStdinWrite {
		return 0, fmt.Errorf("stdin write of %d bytes exceeds %d: %w", len(data), maxStdinWrite, errdefs.ErrInvalidArgument)
	}
	if err := s.acquire(ctx); err != nil {
		return 0, err
	}
	defer s.release()
	if s.closed {
		return s.written, fmt.Errorf("stdin is closed: %w", errdefs.ErrFailedPrecondition)
	}
	if offset > s.written {
		return s.written, fmt.Errorf("stdin offset %d is beyond the %d bytes written: %w", offset, s.written, errdefs.ErrInvalidArgument)
	}
	skip := s.written - offset
	if skip >= uint64(len(data)) {
		return s.written, nil
	}
	// A done ctx interrupts a blocked pipe write through its deadline.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = s.w.SetWriteDeadline(time.Now())
		close(fired)
	})
	n, err := s.w.Write(data[skip:])
	if !stop() {
		// The deadline was set: clear it for the next call.
		<-fired
		_ = s.w.SetWriteDeadline(time.Time{})
	}
	s.written += uint64(n)
	switch {
	case err == nil:
		return s.written, nil
	case errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil:
		return s.written, ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded):
		return s.written, nil
	default:
		return s.written, fmt.Errorf("write stdin: %v: %w", err, errdefs.ErrFailedPrecondition)
	}
}

// Close ends the input after the writes in progress: the pipe is closed (or,
// for a terminal, end-of-file is typed) and the process reads EOF. Closing
// twice is not an error.
func (s *inStream) Close(ctx context.Context) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.eof != nil {
		return s.eof(s.w)
	}
	return s.w.Close()
}

// discard closes the pipe without waiting for pending writes: the process is
// being forgotten. A blocked writer fails, and a later Close is a no-op.
func (s *inStream) discard() {
	// Unblock a writer stuck on a full pipe, then take the token.
	_ = s.w.SetWriteDeadline(time.Now())
	<-s.sem
	defer s.release()
	if !s.closed {
		s.closed = true
		_ = s.w.Close()
	}
}
