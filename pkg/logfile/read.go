package logfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// ReadOptions say which frames Read passes on and when it stops.
type ReadOptions struct {
	// Since skips frames stamped before it; the zero time skips none.
	Since time.Time
	// Follow makes Read wait for more frames at the end of the log
	// instead of returning.
	Follow bool
	// Done, when following, says the writer is finished: once it is
	// closed, Read reads to the end of the log one last time and returns
	// nil. A nil Done is never closed.
	Done <-chan struct{}
}

// Read reads the log at path from its start and calls fn with each frame,
// in order, until the end of the log; fn owns the frame's Data. When
// following (o.Follow), Read waits at the end of the log for more, woken
// by inotify, until ctx is done (it returns ctx.Err()) or o.Done is
// closed (it returns nil after reading everything written before); it
// also returns nil after reading to the end once the file is gone (its
// watch was removed). An error of fn stops Read and is returned as is.
//
// A partial frame at the end of the log is waited for when following, and
// ignored otherwise (the writer may be mid-write). A missing file is an
// error wrapping fs.ErrNotExist; a corrupt frame one wrapping ErrCorrupt
// that names its offset.
func Read(ctx context.Context, path string, o ReadOptions, fn func(Frame) error) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read log: %w", err)
	}
	defer f.Close()
	var w *watcher
	if o.Follow {
		// Watching before the first read means every write after a
		// read found the end of the log wakes the wait that follows.
		if w, err = newWatcher(f); err != nil {
			return fmt.Errorf("follow log %s: %w", path, err)
		}
		defer w.close()
		defer w.interruptOn(ctx, o.Done)()
	}
	d := decoder{path: path, buf: make([]byte, readBufferSize)}
	// final is set once the read under way is the last: the writer is
	// finished or the file gone.
	final := false
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.frames(o.Since, fn); err != nil {
			return err
		}
		if o.Follow && isClosed(o.Done) {
			final = true
		}
		n, err := d.fill(f)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read log %s: %w", path, err)
		}
		if n > 0 {
			continue
		}
		if !o.Follow || final {
			return nil
		}
		gone, err := w.wait()
		if ctxErr := ctx.Err(); ctxErr != nil {
			return ctxErr
		}
		if err != nil {
			return fmt.Errorf("follow log %s: %w", path, err)
		}
		final = final || gone
	}
}

// isClosed reports whether c is closed; a nil c never is.
func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// readBufferSize is a decoder's initial buffer: room for the largest frame
// a writer makes, and more. A longer frame grows it.
const readBufferSize = 64 << 10

// decoder splits what is read from a log into frames.
type decoder struct {
	// path names the log in errors.
	path string
	// buf[start:end] is read and not yet decoded.
	buf        []byte
	start, end int
	// off is the log's offset of buf[start].
	off int64
}

// frames calls fn with each complete frame buffered not stamped before
// since, and returns fn's error or a corrupt frame's.
func (d *decoder) frames(since time.Time, fn func(Frame) error) error {
	for {
		fr, ok, err := d.next()
		if err != nil || !ok {
			return err
		}
		if fr.Time.Before(since) {
			continue
		}
		if err := fn(fr); err != nil {
			return err
		}
	}
}

// next decodes the next frame; ok is false if it is not all buffered yet.
// The buffer is grown to hold a frame whose header says it is longer.
func (d *decoder) next() (fr Frame, ok bool, err error) {
	b := d.buf[d.start:d.end]
	if len(b) < headerSize {
		return Frame{}, false, nil
	}
	s, t, n := parseHeader(b)
	if !s.valid() {
		return Frame{}, false, fmt.Errorf("%w %s: unknown stream byte 0x%02x at offset %d", ErrCorrupt, d.path, uint8(s), d.off)
	}
	if n > maxReadFrame {
		return Frame{}, false, fmt.Errorf("%w %s: frame length %d above %d at offset %d", ErrCorrupt, d.path, n, maxReadFrame, d.off)
	}
	size := headerSize + int(n)
	if len(b) < size {
		if size > len(d.buf) {
			buf := make([]byte, size)
			d.end, d.start, d.buf = copy(buf, b), 0, buf
		}
		return Frame{}, false, nil
	}
	fr = Frame{Stream: s, Time: t, Data: append([]byte(nil), b[headerSize:size]...)}
	d.start += size
	d.off += int64(size)
	return fr, true, nil
}

// fill reads once from r after what is buffered, moving that to the front
// of the buffer first. There is always room: the buffer holds at least the
// frame under way.
func (d *decoder) fill(r io.Reader) (int, error) {
	if d.start > 0 {
		d.end = copy(d.buf, d.buf[d.start:d.end])
		d.start = 0
	}
	n, err := r.Read(d.buf[d.end:])
	d.end += n
	return n, err
}
