package guest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// findPort returns the /dev path of the virtio-serial port called name.
// Ports and their names are announced by the device after the driver probed
// it, and devtmpfs creates the node asynchronously: findPort retries (every
// 10 ms, up to timeout) until both exist.
func findPort(ctx context.Context, sysDir, name string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if dev, ok := lookupPort(sysDir, name); ok {
			if _, err := os.Stat(dev); err == nil {
				return dev, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no virtio-serial port named %q in %s: %w", name, sysDir, ctx.Err())
		case <-tick.C:
		}
	}
}

// lookupPort scans sysDir (/sys/class/virtio-ports) for a port called name.
func lookupPort(sysDir, name string) (string, bool) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return "", false
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(data)) == name {
			return "/dev/" + e.Name(), true
		}
	}
	return "", false
}

// portListener serves one virtio-serial port as a net.Listener whose
// connections are the host's successive sessions on the port.
//
// The port is opened once, non-blocking, so reads and writes go through Go's
// netpoller and deadlines can interrupt them. Accept waits until the host
// side is connected and returns a connection; the next Accept waits until
// that connection is closed. A connection ends (its Read returns io.EOF) when
// the host disconnects, or when the host reconnected so fast that the guest
// never saw it disconnected: the new session's first request (ttrpc stream 1)
// shows it, and its bytes are carried over to the next connection. An ended
// connection never writes again, so a late reply of the old session cannot
// reach the new one.
type portListener struct {
	// path is the port's device node.
	path string
	// done is closed by Close.
	done chan struct{}
	// closeOnce guards done.
	closeOnce sync.Once
	// writeMu serialises the writes of every connection on the port.
	writeMu sync.Mutex

	// mu guards the fields below.
	mu sync.Mutex
	// f is the port, opened by the first Accept. Guarded by mu.
	f *os.File
	// cur is the connection being served, or nil. Guarded by mu.
	cur *portConn
	// carry holds bytes of a new host session read by the previous
	// connection. Guarded by mu.
	carry []byte
}

var _ net.Listener = (*portListener)(nil)

// newPortListener returns a listener on the port at path.
func newPortListener(path string) *portListener {
	return &portListener{path: path, done: make(chan struct{})}
}

// Accept returns the host's next session on the port.
func (l *portListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	prev := l.cur
	l.mu.Unlock()
	if prev != nil {
		select {
		case <-prev.closed:
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
	f, err := l.open()
	if err != nil {
		return nil, err
	}
	// The previous connection's Close interrupted its I/O with a deadline.
	_ = f.SetDeadline(time.Time{})
	l.mu.Lock()
	carry := l.carry
	l.carry = nil
	l.mu.Unlock()
	if len(carry) == 0 {
		// Bytes carried over prove the host is there; otherwise wait.
		if err := waitHost(f); err != nil {
			select {
			case <-l.done:
				return nil, net.ErrClosed
			default:
				return nil, err
			}
		}
	}
	c := &portConn{l: l, f: f, closed: make(chan struct{}), answered: make(chan struct{}), pending: carry}
	c.buf = make([]byte, 64<<10)
	c.readyBuf = make([]byte, 0, len(c.buf)+frameHeaderSize)
	l.mu.Lock()
	l.cur = c
	l.mu.Unlock()
	return c, nil
}

// open opens the port the first time.
func (l *portListener) open() (*os.File, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.done:
		return nil, net.ErrClosed
	default:
	}
	if l.f != nil {
		return l.f, nil
	}
	fd, err := unix.Open(l.path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: l.path, Err: err}
	}
	l.f = os.NewFile(uintptr(fd), l.path)
	return l.f, nil
}

// Close stops Accept and closes the port, ending every connection.
func (l *portListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	l.mu.Lock()
	f := l.f
	l.mu.Unlock()
	if f != nil {
		return f.Close()
	}
	return nil
}

// Addr names the port.
func (l *portListener) Addr() net.Addr { return portAddr(l.path) }

// current returns the connection being served, or nil.
func (l *portListener) current() *portConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cur
}

// waitHost blocks until the host side of the port is connected: poll(2)
// reports POLLHUP until then, and the driver wakes pollers when the host
// connects, which the netpoller sees as writability.
func waitHost(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	err = rc.Write(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
		if _, err := unix.Poll(fds, 0); err != nil && !errors.Is(err, unix.EINTR) {
			perr = os.NewSyscallError("poll", err)
			return true
		}
		return fds[0].Revents&unix.POLLHUP == 0
	})
	if err != nil {
		return err
	}
	return perr
}

// portAddr is the address of a port: its device path.
type portAddr string

// Network is "virtio-serial".
func (a portAddr) Network() string { return "virtio-serial" }

// String is the port's device path.
func (a portAddr) String() string { return string(a) }

// portConn is one host session on the port, as a net.Conn. It follows the
// ttrpc frames in both directions: to notice a new session, and to count
// requests and responses so shutdown can wait for the last reply.
type portConn struct {
	// l is the listener (for the write lock and carried-over bytes).
	l *portListener
	// f is the port, shared with the other sessions; Close does not close it.
	f *os.File
	// closed is closed by Close.
	closed chan struct{}
	// closeOnce guards closed.
	closeOnce sync.Once
	// stopWrites is set when the session ended or closed. Guarded by l.writeMu.
	stopWrites bool

	// readMu serialises Read and guards the fields below.
	readMu sync.Mutex
	// buf receives reads from f.
	buf []byte
	// pending holds bytes to parse before reading f again.
	pending []byte
	// ready holds parsed bytes for the caller, in readyBuf.
	ready []byte
	// readyBuf is ready's storage: a read plus a held-back header fits.
	readyBuf []byte
	// in follows the request frames.
	in frameParser
	// ended says a new host session began: Read returns io.EOF.
	ended bool

	// mu guards the fields below.
	mu sync.Mutex
	// out follows the response frames. Guarded by mu.
	out frameCounter
	// requests and responses count whole frames. Guarded by mu.
	requests, responses uint64
	// answered is closed and replaced when a response was written. Guarded by mu.
	answered chan struct{}
}

var _ net.Conn = (*portConn)(nil)

// Read returns the session's bytes; io.EOF means the session ended.
func (c *portConn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for len(c.ready) == 0 {
		if c.ended {
			return 0, io.EOF
		}
		select {
		case <-c.closed:
			return 0, net.ErrClosed
		default:
		}
		chunk := c.pending
		c.pending = nil
		if len(chunk) == 0 {
			n, err := c.f.Read(c.buf)
			if n == 0 {
				if err == nil {
					continue
				}
				return 0, err
			}
			chunk = c.buf[:n]
		}
		c.consume(chunk)
	}
	n := copy(p, c.ready)
	c.ready = c.ready[n:]
	return n, nil
}

// consume parses chunk into ready. A partial frame header is held back
// until it is complete. When a request on stream 1 follows other requests,
// a new host session began: the bytes from its header on are carried over
// to the next connection and this one ends.
func (c *portConn) consume(chunk []byte) {
	if len(c.ready) == 0 {
		c.ready = c.readyBuf[:0]
	}
	for len(chunk) > 0 {
		if c.in.skip > 0 {
			k := min(uint64(len(chunk)), c.in.skip)
			c.ready = append(c.ready, chunk[:k]...)
			c.in.skip -= k
			chunk = chunk[k:]
			continue
		}
		k := copy(c.in.hdr[c.in.have:], chunk)
		c.in.have += k
		chunk = chunk[k:]
		if c.in.have < frameHeaderSize {
			return
		}
		c.in.have = 0
		length := binary.BigEndian.Uint32(c.in.hdr[0:4])
		stream := binary.BigEndian.Uint32(c.in.hdr[4:8])
		if c.in.hdr[8] == frameRequest {
			if stream == 1 && c.in.requests > 0 {
				c.endSession(append(c.in.hdr[:], chunk...))
				return
			}
			c.in.requests++
			c.mu.Lock()
			c.requests++
			c.mu.Unlock()
		}
		c.ready = append(c.ready, c.in.hdr[:]...)
		c.in.skip = uint64(length)
	}
}

// endSession ends this session and hands the next session's first bytes to
// the listener. The session never writes again.
func (c *portConn) endSession(next []byte) {
	c.ended = true
	c.l.writeMu.Lock()
	c.stopWrites = true
	c.l.writeMu.Unlock()
	c.l.mu.Lock()
	c.l.carry = next
	c.l.mu.Unlock()
}

// Write writes to the host, unless the session ended.
func (c *portConn) Write(p []byte) (int, error) {
	c.l.writeMu.Lock()
	defer c.l.writeMu.Unlock()
	if c.stopWrites {
		return 0, net.ErrClosed
	}
	n, err := c.f.Write(p)
	if n > 0 {
		c.mu.Lock()
		if k := c.out.feed(p[:n], frameResponse); k > 0 {
			c.responses += k
			close(c.answered)
			c.answered = make(chan struct{})
		}
		c.mu.Unlock()
	}
	return n, err
}

// drain waits until every request read so far has been answered, the
// connection is closed, or ctx is done.
func (c *portConn) drain(ctx context.Context) {
	for {
		c.mu.Lock()
		pending := c.requests > c.responses
		answered := c.answered
		c.mu.Unlock()
		if !pending {
			return
		}
		select {
		case <-answered:
		case <-c.closed:
			return
		case <-ctx.Done():
			return
		}
	}
}

// Close ends the session: its blocked Read and Write are interrupted (by a
// deadline on the shared port, which the next Accept clears) and it never
// touches the port again.
func (c *portConn) Close() error {
	c.closeOnce.Do(func() {
		_ = c.f.SetDeadline(time.Now())
		c.l.writeMu.Lock()
		c.stopWrites = true
		c.l.writeMu.Unlock()
		c.readMu.Lock()
		close(c.closed)
		c.readMu.Unlock()
	})
	return nil
}

// LocalAddr is the port.
func (c *portConn) LocalAddr() net.Addr { return portAddr(c.f.Name()) }

// RemoteAddr is the host.
func (c *portConn) RemoteAddr() net.Addr { return portAddr("host") }

// SetDeadline sets the port's deadlines. The port is shared by successive
// sessions: the next Accept clears them.
func (c *portConn) SetDeadline(t time.Time) error { return c.f.SetDeadline(t) }

// SetReadDeadline sets the port's read deadline (see SetDeadline).
func (c *portConn) SetReadDeadline(t time.Time) error { return c.f.SetReadDeadline(t) }

// SetWriteDeadline sets the port's write deadline (see SetDeadline).
func (c *portConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// ttrpc frame types (github.com/containerd/ttrpc channel.go).
const (
	frameRequest  = 1
	frameResponse = 2
	// frameHeaderSize is length(4) + stream id(4) + type(1) + flags(1).
	frameHeaderSize = 10
)

// frameParser is the state of parsing incoming frames.
type frameParser struct {
	// hdr accumulates the current frame's header.
	hdr [frameHeaderSize]byte
	// have is how many header bytes are in hdr.
	have int
	// skip is how many payload bytes of the current frame remain.
	skip uint64
	// requests counts the request frames of the session.
	requests uint64
}

// frameCounter follows the ttrpc frames of one direction of a byte stream.
type frameCounter struct {
	// hdr accumulates the current frame's header.
	hdr [frameHeaderSize]byte
	// have is how many header bytes are in hdr.
	have int
	// skip is how many payload bytes of the current frame remain.
	skip uint64
	// typ is the current frame's type, valid once its header is complete.
	typ byte
}

// feed consumes p and returns how many frames of type typ it completed
// (header and payload).
func (f *frameCounter) feed(p []byte, typ byte) uint64 {
	var n uint64
	for len(p) > 0 {
		if f.skip > 0 {
			k := min(uint64(len(p)), f.skip)
			f.skip -= k
			p = p[k:]
			if f.skip == 0 && f.typ == typ {
				n++
			}
			continue
		}
		k := copy(f.hdr[f.have:], p)
		f.have += k
		p = p[k:]
		if f.have < frameHeaderSize {
			break
		}
		f.have = 0
		f.skip = uint64(binary.BigEndian.Uint32(f.hdr[0:4]))
		f.typ = f.hdr[8]
		if f.skip == 0 && f.typ == typ {
			n++
		}
	}
	return n
}
