package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
)

// chunkConn is a net.Conn whose Read hands out src at most chunk bytes at a
// time, as a socket fed by a slow or fragmenting peer would. It records
// Close. Only Read and Close are implemented: guardConn uses nothing else.
type chunkConn struct {
	net.Conn

	// chunk is the most bytes one Read returns.
	chunk int

	// mu guards src and closed.
	mu sync.Mutex
	// src is what is left to read. Guarded by mu.
	src []byte
	// closed says Close was called. Guarded by mu.
	closed bool
}

func newChunkConn(src []byte, chunk int) *chunkConn {
	return &chunkConn{src: src, chunk: chunk}
}

func (c *chunkConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	if len(c.src) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.chunk)], c.src)
	c.src = c.src[n:]
	return n, nil
}

func (c *chunkConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *chunkConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// readInChunks reads r with buffers of size bytes until it fails and returns
// what it read and the error it stopped at (nil for io.EOF).
func readInChunks(t *testing.T, r io.Reader, size int) ([]byte, error) {
	t.Helper()
	var out bytes.Buffer
	buf := make([]byte, size)
	for {
		n, err := r.Read(buf)
		if n < 0 || n > size {
			t.Fatalf("Read returned n=%d for a %d-byte buffer", n, size)
		}
		out.Write(buf[:n])
		if errors.Is(err, io.EOF) {
			return out.Bytes(), nil
		}
		if err != nil {
			if n != 0 {
				t.Fatalf("Read returned %d bytes with error %v", n, err)
			}
			return out.Bytes(), err
		}
	}
}

// randomBytes returns n deterministic pseudo-random bytes.
func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// validFrames is a stream of legitimate guest frames: every allowed type,
// every known flag, empty and non-empty payloads, the largest stream id.
func validFrames() []byte {
	var b []byte
	b = append(b, frame(1, frameTypeResp, 0, nil)...)
	b = append(b, frame(3, frameTypeData, 0x1, []byte("hello"))...)
	b = append(b, frame(5, frameTypeResp, 0x7, randomBytes(1000, 1))...)
	b = append(b, frame(0xFFFFFFFF, frameTypeResp, 0, randomBytes(4099, 2))...)
	b = append(b, frame(7, frameTypeData, 0x2|0x4, nil)...)
	b = append(b, frame(9, frameTypeResp, 0, randomBytes(70000, 3))...)
	return b
}

// Verified two-sided: reading the header with a single Read instead of
// io.ReadFull fails every case whose peer splits a header.
func TestGuardPassesValidFramesByteForByte(t *testing.T) {
	want := validFrames()
	tests := []struct {
		name      string
		connChunk int // most bytes the peer's socket delivers per read
		readSize  int // buffer the reader (ttrpc's bufio) reads into
	}{
		{"peer and reader one byte at a time", 1, 1},
		{"peer one byte at a time", 1, 4096},
		{"reader one byte at a time", 4096, 1},
		{"header split across reads", 3, 7},
		{"reader buffer of exactly one header", 4096, frameHeaderLen},
		{"reader buffer one over a header", 13, frameHeaderLen + 1},
		{"odd sizes", 97, 33},
		{"large reads", 1 << 20, 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := newChunkConn(want, tt.connChunk)
			g := newGuardConn(conn, MaxFrame)
			got, err := readInChunks(t, g, tt.readSize)
			if err != nil {
				t.Fatalf("read valid frames: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("guard changed the stream: got %d bytes, want %d", len(got), len(want))
			}
			if g.Err() != nil || conn.isClosed() {
				t.Fatalf("valid frames: Err()=%v closed=%v, want nil and open", g.Err(), conn.isClosed())
			}
		})
	}
}

// Verified two-sided: removing the length check from checkHeader, or the
// Close of the connection on a violation, fails the rejected cases.
func TestGuardFrameLengthLimit(t *testing.T) {
	tests := []struct {
		name   string
		length uint32
		ok     bool
	}{
		{"empty", 0, true},
		{"one under MaxFrame", MaxFrame - 1, true},
		{"exactly MaxFrame", MaxFrame, true},
		{"one over MaxFrame", MaxFrame + 1, false},
		{"8 MiB", 8 << 20, false},
		{"largest uint32", 1<<32 - 1, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := header(tt.length, 1, frameTypeResp, 0)
			if tt.ok {
				in = append(in, randomBytes(int(tt.length), 4)...)
			}
			conn := newChunkConn(in, 64<<10)
			g := newGuardConn(conn, MaxFrame)
			got, err := readInChunks(t, g, 4096)
			if tt.ok {
				if err != nil {
					t.Fatalf("frame of %d bytes rejected: %v", tt.length, err)
				}
				if !bytes.Equal(got, in) {
					t.Fatalf("frame of %d bytes changed in transit", tt.length)
				}
				return
			}
			requireProtocolError(t, err)
			if len(got) != 0 {
				t.Fatalf("%d bytes of an oversized frame reached the reader", len(got))
			}
			if !strings.Contains(err.Error(), "exceeds") {
				t.Fatalf("error %q does not name the size limit", err)
			}
			if !conn.isClosed() {
				t.Fatal("connection left open after an oversized frame")
			}
		})
	}
}

// Verified two-sided: removing each clause of checkHeader in turn (length,
// type, stream id, flags) fails the matching cases; so does removing from
// guardConn.Read the Close, the sticky Err check at its top, or the clamp of
// a payload read to the frame (which lets the next header through unchecked).
func TestGuardRejectsProtocolViolations(t *testing.T) {
	valid := frame(1, frameTypeResp, 0, []byte("ok"))
	tests := []struct {
		name    string
		prefix  []byte // valid frames before the violation, delivered intact
		bad     []byte // the offending bytes
		wantMsg string // what the error names
	}{
		{"oversized length", nil, header(MaxFrame+1, 1, frameTypeResp, 0), "exceeds"},
		{"request frame type", nil, frame(1, frameTypeRequest, 0, nil), "type 0x1"},
		{"zero frame type", nil, frame(1, 0x0, 0, nil), "type"},
		{"unknown frame type 0x4", nil, frame(1, 0x4, 0, nil), "type 0x4"},
		{"unknown frame type 0xff", nil, frame(1, 0xff, 0, nil), "type 0xff"},
		{"stream id 0", nil, frame(0, frameTypeResp, 0, nil), "stream 0"},
		{"even stream id 2", nil, frame(2, frameTypeResp, 0, nil), "stream 2"},
		{"even stream id 1<<31", nil, frame(1<<31, frameTypeData, 0, nil), "stream"},
		{"unknown flag 0x8", nil, frame(1, frameTypeResp, 0x8, nil), "flags 0x8"},
		{"unknown flags 0xff", nil, frame(1, frameTypeResp, 0xff, nil), "flags 0xff"},
		{"garbage text", nil, []byte("HTTP/1.1 400 Bad Request\r\n\r\n"), ""},
		{"garbage zeros", nil, make([]byte, 64), ""},
		{"garbage small length", nil, []byte("\x00\x00\x00\x05garbage!!"), ""},
		{"violation after valid frames", valid, frame(2, frameTypeResp, 0, nil), "stream 2"},
		{"violation after an empty frame", frame(3, frameTypeResp, 0, nil), frame(3, frameTypeRequest, 0, nil), "type"},
	}
	for _, tt := range tests {
		for _, chunk := range []int{1, 4096} {
			t.Run(fmt.Sprintf("%s/chunk=%d", tt.name, chunk), func(t *testing.T) {
				conn := newChunkConn(append(append([]byte(nil), tt.prefix...), tt.bad...), chunk)
				g := newGuardConn(conn, MaxFrame)

				got, err := readInChunks(t, g, 7)
				requireProtocolError(t, err)
				if !strings.Contains(err.Error(), tt.wantMsg) {
					t.Fatalf("error %q does not mention %q", err, tt.wantMsg)
				}
				if !bytes.Equal(got, tt.prefix) {
					t.Fatalf("reader got %q, want exactly the valid prefix %q", got, tt.prefix)
				}
				if !conn.isClosed() {
					t.Fatal("connection left open after a violation")
				}
				requireProtocolError(t, g.Err())
				for i := range 3 {
					n, err := g.Read(make([]byte, 64))
					if n != 0 || !errors.Is(err, ErrProtocol) {
						t.Fatalf("read %d after the violation = (%d, %v), want (0, ErrProtocol)", i, n, err)
					}
				}
			})
		}
	}
}

// A peer that hangs up inside a header is a broken connection, not a
// protocol violation: the reader gets the read error and Err stays nil.
//
// Verified two-sided: wrapping the header read error in ErrProtocol fails it.
func TestGuardReportsTruncatedHeaderAsReadError(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want []byte
	}{
		{"inside the first header", header(0, 1, frameTypeResp, 0)[:4], nil},
		{"inside a later header", append(frame(1, frameTypeResp, 0, nil), 0, 0), frame(1, frameTypeResp, 0, nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGuardConn(newChunkConn(tt.in, 1), MaxFrame)
			got, err := readInChunks(t, g, 16)
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("error = %v, want io.ErrUnexpectedEOF", err)
			}
			if errors.Is(err, ErrProtocol) || g.Err() != nil {
				t.Fatalf("truncation classified as a protocol violation: %v / %v", err, g.Err())
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("reader got %q, want %q", got, tt.want)
			}
		})
	}
}
