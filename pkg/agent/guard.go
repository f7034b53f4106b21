package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Frame layout of ttrpc (github.com/containerd/ttrpc channel.go): a 10-byte
// header (length uint32 BE, stream id uint32 BE, type, flags), then length
// bytes of payload.
const (
	frameHeaderLen   = 10
	frameTypeRequest = 0x1
	frameTypeResp    = 0x2
	frameTypeData    = 0x3
)

// MaxFrame is the largest frame the host accepts from the guest: the largest
// legitimate response (ReadStdio's 1 MiB of data) plus room for its envelope.
const MaxFrame = 1<<20 + 64<<10

// ErrProtocol classifies a guest that broke the framing rules: garbage, an
// oversized message, a message the host never asked for (an answer to a
// call never made, or a second answer to one), a frame that stalls
// half-sent, or a guest that stops reading. The connection is closed when
// it happens; the VM must be treated as failed.
var ErrProtocol = errors.New("agent protocol violation")

// frameTimeout bounds how long the rest of a frame may take once its first
// byte arrived: a guest may be silent between frames (it holds long polls),
// never inside one. It also bounds each write of the host: the guest's
// agent reads all the time. A frame is at most MaxFrame (a write at most
// ChunkSize and its envelope): a 1 MiB ReadStdio took 64 ms from call to
// answer under TCG on a loaded 2-core host. A variable only so that tests
// can shorten it.
var frameTimeout = 10 * time.Second

// maxWaitingCalls bounds the calls a client guard remembers as unanswered.
// The guest answers every call by its deadline, so only a guest that
// ignores calls gets near it; the oldest are then forgotten, and a late
// answer to one is taken for a second answer.
const maxWaitingCalls = 1024

// guardConn is a net.Conn that checks every ttrpc frame header the guest
// sends before the ttrpc client sees it. The guest is untrusted: without the
// guard, ttrpc would accept 4 MiB frames and log and skip garbage instead of
// failing. On the first violation the connection is closed and Read returns
// an error wrapping ErrProtocol.
//
// A client's guard (newClientGuard) also follows the calls the host writes:
// every frame from the guest must belong to a call the host sent and the
// guest has not answered yet (all of the agent's calls are unary: one
// response each), a frame once begun must arrive whole within
// frameTimeout, and each write must be taken within it. Without that,
// ttrpc logs and skips answers to calls never made, as fast as a guest
// sends them; a frame stalled half-sent blocks every call of the
// connection until its deadline, for ever after; and a guest that stops
// reading blocks the host's writes past every deadline.
type guardConn struct {
	net.Conn
	max uint32
	// stallAfter is how long the rest of a frame may take once its first
	// byte arrived; 0: unbounded.
	stallAfter time.Duration
	// follow says the calls are followed (waiting is kept).
	follow bool

	// The framing state is touched only by Read, which ttrpc calls from its
	// single receive goroutine.

	// pending holds header bytes not yet handed to the reader.
	pending []byte
	// remaining counts payload bytes of the current frame still to read.
	remaining uint32
	// length is the current frame's payload length.
	length uint32
	// hdr is the buffer pending points into.
	hdr [frameHeaderLen]byte

	// wmu guards out, the framing state of what the host writes.
	wmu sync.Mutex
	out frameCounter

	// mu guards the fields below.
	mu sync.Mutex
	// violation is the first protocol error seen. Guarded by mu.
	violation error
	// waiting holds the stream ids of the calls the host sent that the
	// guest has not answered, when follow. Guarded by mu.
	waiting map[uint32]struct{}
	// highest is the highest stream id the host sent a call on. Guarded
	// by mu.
	highest uint32
}

func newGuardConn(c net.Conn, max uint32) *guardConn {
	return &guardConn{Conn: c, max: max}
}

// newClientGuard returns the guard of a Client's connection: the framing
// checks of newGuardConn, and the calls followed and frames bounded in time.
func newClientGuard(c net.Conn, max uint32) *guardConn {
	g := newGuardConn(c, max)
	g.follow, g.waiting = true, map[uint32]struct{}{}
	g.stallAfter = frameTimeout
	return g
}

// Read implements io.Reader, validating frame headers on the way through.
func (g *guardConn) Read(p []byte) (int, error) {
	if err := g.Err(); err != nil {
		return 0, err
	}
	if len(g.pending) > 0 {
		n := copy(p, g.pending)
		g.pending = g.pending[n:]
		return n, nil
	}
	if g.remaining > 0 {
		if uint32(len(p)) > g.remaining {
			p = p[:g.remaining]
		}
		n, err := g.Conn.Read(p)
		g.remaining -= uint32(n)
		if g.remaining == 0 {
			g.frameDone()
		} else if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, g.stalled(fmt.Errorf("frame stalled: %d of its %d payload bytes arrived within %v", g.length-g.remaining, g.length, g.stallAfter))
		}
		return n, err
	}
	// The guest may be silent before a frame, never inside one: the clock
	// starts at its first byte.
	if _, err := io.ReadFull(g.Conn, g.hdr[:1]); err != nil {
		return 0, err
	}
	g.frameBegun()
	if n, err := io.ReadFull(g.Conn, g.hdr[1:]); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, g.stalled(fmt.Errorf("frame header stalled: %d of its %d bytes arrived within %v", 1+n, frameHeaderLen, g.stallAfter))
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	err := checkHeader(g.hdr[:], g.max)
	if err == nil {
		err = g.answered(g.hdr[:])
	}
	if err != nil {
		err = fmt.Errorf("%w: %v", ErrProtocol, err)
		g.fail(err)
		return 0, err
	}
	g.length = binary.BigEndian.Uint32(g.hdr[:4])
	g.remaining = g.length
	if g.remaining == 0 {
		g.frameDone()
	}
	g.pending = g.hdr[:]
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

// frameBegun starts the clock of a frame whose first byte arrived.
func (g *guardConn) frameBegun() {
	if g.stallAfter > 0 {
		_ = g.Conn.SetReadDeadline(time.Now().Add(g.stallAfter))
	}
}

// frameDone stops the clock once a frame arrived whole.
func (g *guardConn) frameDone() {
	if g.stallAfter > 0 {
		_ = g.Conn.SetReadDeadline(time.Time{})
	}
}

// stalled fails the connection for a frame that did not arrive in time.
func (g *guardConn) stalled(why error) error {
	err := fmt.Errorf("%w: %v", ErrProtocol, why)
	g.fail(err)
	return err
}

// Write implements io.Writer, noting the calls the host sends (before they
// can be answered) when calls are followed. When frames are bounded in
// time, a guest that stops reading fails the connection after stallAfter:
// ttrpc's writes ignore the call's deadline, and hold the lock every other
// call needs to send.
func (g *guardConn) Write(p []byte) (int, error) {
	if g.follow {
		g.wmu.Lock()
		g.out.feed(p, g.sent)
		g.wmu.Unlock()
	}
	if g.stallAfter <= 0 {
		return g.Conn.Write(p)
	}
	_ = g.Conn.SetWriteDeadline(time.Now().Add(g.stallAfter))
	n, err := g.Conn.Write(p)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = g.stalled(fmt.Errorf("guest stopped reading: %d of %d bytes taken within %v", n, len(p), g.stallAfter))
	}
	return n, err
}

// sent notes a frame header the host writes.
func (g *guardConn) sent(h []byte) {
	if h[8] != frameTypeRequest {
		return
	}
	stream := binary.BigEndian.Uint32(h[4:8])
	g.mu.Lock()
	defer g.mu.Unlock()
	g.waiting[stream] = struct{}{}
	g.highest = max(g.highest, stream)
	if len(g.waiting) > maxWaitingCalls && g.highest > 2*maxWaitingCalls {
		// ttrpc numbers calls 1, 3, 5...: forget all but the last
		// maxWaitingCalls calls.
		for id := range g.waiting {
			if id <= g.highest-2*maxWaitingCalls {
				delete(g.waiting, id)
			}
		}
	}
}

// answered checks that a frame from the guest (its header h passed
// checkHeader) belongs to a call waiting for its answer; a response is that
// answer.
func (g *guardConn) answered(h []byte) error {
	if !g.follow {
		return nil
	}
	stream := binary.BigEndian.Uint32(h[4:8])
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.waiting[stream]; !ok {
		if stream > g.highest {
			return fmt.Errorf("frame on stream %d that the host never opened", stream)
		}
		return fmt.Errorf("frame on stream %d, whose call was answered already", stream)
	}
	if h[8] == frameTypeResp {
		delete(g.waiting, stream)
	}
	return nil
}

// fail records err as the violation that closed the connection, unless one
// was recorded first, and closes the connection. It is safe to call from any
// goroutine.
func (g *guardConn) fail(err error) {
	g.mu.Lock()
	if g.violation == nil {
		g.violation = err
	}
	g.mu.Unlock()
	_ = g.Conn.Close()
}

// Err returns the protocol violation that closed the connection, if any.
func (g *guardConn) Err() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.violation
}

// checkHeader validates one frame header received by the host.
func checkHeader(h []byte, max uint32) error {
	length := binary.BigEndian.Uint32(h[0:4])
	stream := binary.BigEndian.Uint32(h[4:8])
	typ, flags := h[8], h[9]
	switch {
	case length > max:
		return fmt.Errorf("frame of %d bytes exceeds the %d-byte limit", length, max)
	case typ != frameTypeResp && typ != frameTypeData:
		return fmt.Errorf("unexpected frame type %#x", typ)
	case stream == 0 || stream%2 == 0:
		// The host's client opens odd stream ids only.
		return fmt.Errorf("frame on stream %d that the host never opened", stream)
	case flags&^0x7 != 0:
		return fmt.Errorf("unknown frame flags %#x", flags)
	}
	return nil
}

// frameCounter follows the frame headers of one direction of a byte
// stream written in pieces of any size.
type frameCounter struct {
	// hdr accumulates the current frame's header; have bytes of it.
	hdr  [frameHeaderLen]byte
	have int
	// skip is how many payload bytes of the current frame remain.
	skip uint64
}

// feed consumes p, calling header with each frame header it completes.
func (f *frameCounter) feed(p []byte, header func(h []byte)) {
	for len(p) > 0 {
		if f.skip > 0 {
			k := min(uint64(len(p)), f.skip)
			f.skip -= k
			p = p[k:]
			continue
		}
		k := copy(f.hdr[f.have:], p)
		f.have += k
		p = p[k:]
		if f.have < frameHeaderLen {
			return
		}
		f.have = 0
		f.skip = uint64(binary.BigEndian.Uint32(f.hdr[0:4]))
		header(f.hdr[:])
	}
}
