package logfile

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// NewWriters returns the stdout and stderr writers of one log written to
// w. Each Write becomes one or more frames (at most MaxFrame bytes of data
// each) stamped with time.Now(), each written to w with one Write call
// (one write(2) for an *os.File; open it O_APPEND) under a mutex shared by
// both writers, so that frames never interleave. Write returns len(p) on
// success; an empty Write writes nothing.
//
// A Write of w that wrote part of a frame leaves the log ending in a
// partial frame: from then on both writers fail, so that no frame follows
// it and readers still find every frame before it.
func NewWriters(w io.Writer) (stdout, stderr io.Writer) {
	l := &framer{w: w}
	return &streamWriter{l: l, s: Stdout}, &streamWriter{l: l, s: Stderr}
}

// framer frames the writes of both streams of one log.
type framer struct {
	mu sync.Mutex
	// w is where frames go; guarded by mu.
	w io.Writer
	// buf holds the frame being written, reused; guarded by mu.
	buf []byte
	// torn is set once a frame was written in part; guarded by mu.
	torn error
}

// streamWriter is the io.Writer of one stream of a log.
type streamWriter struct {
	l *framer
	s Stream
}

// Write writes p to the log as frames of the writer's stream.
func (sw *streamWriter) Write(p []byte) (int, error) {
	l := sw.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.torn != nil {
		return 0, l.torn
	}
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxFrame)]
		l.buf = appendHeader(l.buf[:0], sw.s, time.Now(), len(chunk))
		l.buf = append(l.buf, chunk...)
		n, err := l.w.Write(l.buf)
		if err == nil && n < len(l.buf) {
			err = io.ErrShortWrite
		}
		if err != nil {
			err = fmt.Errorf("write %s frame: %w", sw.s, err)
			if n > 0 {
				l.torn = fmt.Errorf("log ends in a partial frame: %w", err)
			}
			return written, err
		}
		written += len(chunk)
		p = p[len(chunk):]
	}
	return written, nil
}
