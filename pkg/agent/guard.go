package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
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
// oversized message, or a message the host never asked for. The connection is
// closed when it happens; the VM must be treated as failed.
var ErrProtocol = errors.New("agent protocol violation")

// guardConn is a net.Conn that checks every ttrpc frame header the guest
// sends before the ttrpc client sees it. The guest is untrusted: without the
// guard, ttrpc would accept 4 MiB frames and log and skip garbage instead of
// failing. On the first violation the connection is closed and Read returns
// an error wrapping ErrProtocol.
type guardConn struct {
	net.Conn
	max uint32

	// The framing state is touched only by Read, which ttrpc calls from its
	// single receive goroutine.

	// pending holds header bytes not yet handed to the reader.
	pending []byte
	// remaining counts payload bytes of the current frame still to read.
	remaining uint32
	// hdr is the buffer pending points into.
	hdr [frameHeaderLen]byte

	// mu guards violation, which Err reads from other goroutines.
	mu sync.Mutex
	// violation is the first protocol error seen. Guarded by mu.
	violation error
}

func newGuardConn(c net.Conn, max uint32) *guardConn {
	return &guardConn{Conn: c, max: max}
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
		return n, err
	}
	if _, err := io.ReadFull(g.Conn, g.hdr[:]); err != nil {
		return 0, err
	}
	if err := checkHeader(g.hdr[:], g.max); err != nil {
		err = fmt.Errorf("%w: %v", ErrProtocol, err)
		g.fail(err)
		return 0, err
	}
	g.remaining = binary.BigEndian.Uint32(g.hdr[:4])
	g.pending = g.hdr[:]
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
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
