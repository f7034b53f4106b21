package vmm

import (
	"bytes"
	"errors"
	"io"
	"os"
	"sync"

	"github.com/containerd/log"
)

// Bounds of the in-memory console tail.
const (
	tailLines   = 256
	tailLineMax = 1024
)

// console records what the guest and the monitor write to the console: a
// size-capped log file (rotated once to <path>.1 when full) and a ring of
// the last lines for ConsoleTail.
type console struct {
	// path is the log file; max caps its size in bytes.
	path string
	max  int64

	// mu guards every field below.
	mu sync.Mutex
	// file is the open log, nil when it could not be opened. Guarded by mu.
	file *os.File
	// size is the number of bytes in file. Guarded by mu.
	size int64
	// lines is a ring of the last complete lines; next is the slot the
	// next line goes to and full says the ring has wrapped. Guarded by mu.
	lines []string
	next  int
	full  bool
	// partial is the current line, not yet ended by '\n'. Guarded by mu.
	partial []byte
	// failed says a write error was already logged. Guarded by mu.
	failed bool
}

// newConsole creates (truncating) the log file at path.
func newConsole(path string, max int64) (*console, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	return &console{path: path, max: max, file: f, lines: make([]string, tailLines)}, nil
}

// drain copies r into the console until EOF or a read error, then closes
// the log file. It never stops reading early: a monitor whose console pipe
// fills up would stall.
func (c *console) drain(r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_, _ = c.Write(buf[:n])
		}
		if err != nil {
			break
		}
	}
	c.close()
}

// Write appends p to the log file and the tail. It always reports success:
// losing the log must not stop the console from being drained.
func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writeFileLocked(p)
	c.addLinesLocked(p)
	return len(p), nil
}

// writeFileLocked appends p to the file, rotating it whenever it would
// pass max.
func (c *console) writeFileLocked(p []byte) {
	for len(p) > 0 && c.file != nil {
		room := c.max - c.size
		if room <= 0 {
			c.rotateLocked()
			continue
		}
		n := int64(len(p))
		if n > room {
			n = room
		}
		w, err := c.file.Write(p[:n])
		c.size += int64(w)
		if err != nil {
			c.failLocked(err)
			return
		}
		p = p[n:]
	}
}

// rotateLocked moves the full log to <path>.1 and starts an empty one.
func (c *console) rotateLocked() {
	c.file.Close()
	c.file = nil
	if err := os.Rename(c.path, c.path+".1"); err != nil {
		c.failLocked(err)
		return
	}
	f, err := os.OpenFile(c.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		c.failLocked(err)
		return
	}
	c.file, c.size = f, 0
}

// failLocked logs the first write error; the tail keeps working.
func (c *console) failLocked(err error) {
	if !c.failed {
		c.failed = true
		log.L.WithError(err).WithField("path", c.path).Warn("vmm console log write failed")
	}
}

// addLinesLocked splits p into lines for the ring, dropping '\r' and
// capping each line at tailLineMax bytes.
func (c *console) addLinesLocked(p []byte) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		chunk := p
		if i >= 0 {
			chunk = p[:i]
		}
		for _, b := range chunk {
			if b != '\r' && len(c.partial) < tailLineMax {
				c.partial = append(c.partial, b)
			}
		}
		if i < 0 {
			return
		}
		c.lines[c.next] = string(c.partial)
		c.next = (c.next + 1) % len(c.lines)
		c.full = c.full || c.next == 0
		c.partial = c.partial[:0]
		p = p[i+1:]
	}
}

// Tail returns up to the last n lines, oldest first, including an
// unterminated last line.
func (c *console) Tail(n int) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var all []string
	if c.full {
		all = append(all, c.lines[c.next:]...)
	}
	all = append(all, c.lines[:c.next]...)
	if len(c.partial) > 0 {
		all = append(all, string(c.partial))
	}
	if n < 0 {
		n = 0
	}
	if n < len(all) {
		all = all[len(all)-n:]
	}
	return all
}

// close closes the log file. Writes after close only feed the tail.
func (c *console) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.file != nil {
		if err := c.file.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			c.failLocked(err)
		}
		c.file = nil
	}
}
