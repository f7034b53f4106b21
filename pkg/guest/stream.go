package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// Bounds of the stdio API (agent.proto).
const (
	// outBufferSize is how many unacknowledged bytes one output stream keeps
	// before it stops reading its pipe (and so the writer blocks).
	outBufferSize = 1 << 20
	// maxReadSize caps ReadStdioRequest.max.
	maxReadSize = 1 << 20
	// maxStdinWrite caps WriteStdinRequest.data.
	maxStdinWrite = 1 << 20
	// maxWait caps every wait_ms of the API.
	maxWait = 60 * time.Second
	// readChunk is the size of one read from an output pipe.
	readChunk = 32 << 10
)

// outStream buffers one output stream (stdout or stderr) of a process between
// the pipe it reads and the host, which pulls it by offset.
//
// Invariants: buf holds the stream's bytes [base, base+len(buf)); bytes before
// base were acknowledged by the host and forgotten; len(buf) <= limit, and the
// pump does not read the pipe while the buffer is full, so a process that
// writes faster than the host reads blocks instead of losing output.
type outStream struct {
	// limit bounds len(buf).
	limit int

	// mu guards every field below.
	mu sync.Mutex
	// buf holds the unacknowledged bytes. Guarded by mu.
	buf []byte
	// base is the stream offset of buf[0]. Guarded by mu.
	base uint64
	// eof says the pipe reached its end (or failed); no byte follows buf.
	// Guarded by mu.
	eof bool
	// closed says the stream was discarded: the pump must stop. Guarded by mu.
	closed bool
	// changed is closed and replaced whenever data or eof arrives, waking
	// every reader waiting for it. Guarded by mu.
	changed chan struct{}
	// space is signalled when the host acknowledges bytes or the stream is
	// closed, waking the pump. Guarded by mu.
	space *sync.Cond

	// pipe is the read end being pumped, nil for a stream without one.
	pipe io.ReadCloser
	// done is closed when the pump goroutine has returned.
	done chan struct{}
}

// newOutStream returns a stream that pumps r (if not nil) into a buffer of at
// most limit bytes. A nil r makes an empty stream already at EOF.
func newOutStream(r io.ReadCloser, limit int) *outStream {
	s := &outStream{limit: limit, changed: make(chan struct{}), pipe: r, done: make(chan struct{})}
	s.space = sync.NewCond(&s.mu)
	if r == nil {
		s.eof = true
		close(s.done)
		return s
	}
	go s.pump()
	return s
}

// pump reads the pipe into the buffer until EOF, an error or close, waiting
// for room whenever the buffer is full.
func (s *outStream) pump() {
	defer close(s.done)
	chunk := make([]byte, min(readChunk, s.limit))
	for {
		s.mu.Lock()
		for len(s.buf) >= s.limit && !s.closed {
			s.space.Wait()
		}
		if s.closed {
			s.mu.Unlock()
			return
		}
		room := s.limit - len(s.buf)
		s.mu.Unlock()

		n, err := s.pipe.Read(chunk[:min(room, len(chunk))])

		s.mu.Lock()
		if n > 0 && !s.closed {
			s.buf = append(s.buf, chunk[:n]...)
		}
		if err != nil {
			// EOF, or the pipe failed or was closed: no more bytes either way.
			s.eof = true
		}
		s.notifyLocked()
		stop := s.eof || s.closed
		s.mu.Unlock()
		if stop {
			return
		}
	}
}

// notifyLocked wakes every reader waiting for data.
func (s *outStream) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// ackLocked forgets the bytes before offset. It fails with
// errdefs.ErrInvalidArgument when offset is before the bytes already
// forgotten or after the bytes produced so far.
func (s *outStream) ackLocked(offset uint64) error {
	end := s.base + uint64(len(s.buf))
	switch {
	case offset < s.base:
		return fmt.Errorf("offset %d is before the acknowledged offset %d: %w", offset, s.base, errdefs.ErrInvalidArgument)
	case offset > end:
		return fmt.Errorf("offset %d is beyond the %d bytes produced: %w", offset, end, errdefs.ErrInvalidArgument)
	}
	if n := int(offset - s.base); n > 0 {
		s.buf = s.buf[n:]
		s.base = offset
		if len(s.buf) == 0 {
			// Release the array; a busy stream allocates a fresh one.
			s.buf = nil
		}
		s.space.Signal()
	}
	return nil
}

// Read acknowledges every byte before offset, waits up to wait (capped at
// maxWait) for data or EOF, and returns at most max (capped at maxReadSize;
// 0 means the cap) bytes starting at offset. eof is true only when the
// returned bytes reach the end of the stream. A call repeated with the same
// offset returns the same bytes (or more). When ctx is done the call answers
// with what is there instead of waiting longer.
func (s *outStream) Read(ctx context.Context, offset uint64, max int, wait time.Duration) (data []byte, eof bool, err error) {
	if max <= 0 || max > maxReadSize {
		max = maxReadSize
	}
	poll := newLongPoll(ctx, wait)
	defer poll.stop()
	for {
		s.mu.Lock()
		if err := s.ackLocked(offset); err != nil {
			s.mu.Unlock()
			return nil, false, err
		}
		if len(s.buf) > 0 || s.eof || s.closed || poll.expired() {
			n := min(max, len(s.buf))
			data = append([]byte(nil), s.buf[:n]...)
			eof = (s.eof || s.closed) && n == len(s.buf)
			s.mu.Unlock()
			return data, eof, nil
		}
		changed := s.changed
		s.mu.Unlock()
		poll.await(changed)
	}
}

// Close discards the stream: the pump stops, the pipe is closed and pending
// readers see EOF. Close waits for the pump to return.
func (s *outStream) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.closed = true
	s.buf = nil
	s.space.Broadcast()
	s.notifyLocked()
	s.mu.Unlock()
	var err error
	if s.pipe != nil {
		// Closing an *os.File pipe unblocks the pump's pending Read.
		err = s.pipe.Close()
	}
	<-s.done
	if errors.Is(err, os.ErrClosed) {
		err = nil
	}
	return err
}

// EOF reports whether the stream has ended.
func (s *outStream) EOF() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.eof || s.closed
}
