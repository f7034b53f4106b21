package api

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Frame types of the stdio stream: the body of GET /v1/boxes/{id}/logs, and
// both directions of an attach or exec connection after the HTTP upgrade.
// Each frame is [1 byte type][4 bytes big-endian length][payload].
const (
	FrameStdin    byte = 0 // client → server: stdin bytes
	FrameStdout   byte = 1 // server → client: stdout bytes
	FrameStderr   byte = 2 // server → client: stderr bytes
	FrameStdinEOF byte = 3 // client → server: stdin ended
	FrameResize   byte = 4 // client → server: JSON Size
	FrameSignal   byte = 5 // client → server: a signal name or number
	FrameExit     byte = 6 // server → client: JSON Exit, the last frame
	FrameError    byte = 7 // server → client: JSON Error, the last frame
)

// MaxFramePayload bounds one frame; longer output is split.
const MaxFramePayload = 1 << 20

// UpgradeProtocol is the Upgrade header value of attach and exec.
const UpgradeProtocol = "boxlite-stream/1"

// StreamContentType is the media type of a stream body (logs).
const StreamContentType = "application/vnd.boxlite.stream"

// WriteFrame writes one frame.
func WriteFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > MaxFramePayload {
		return fmt.Errorf("frame of %d bytes is over the %d limit", len(payload), MaxFramePayload)
	}
	buf := make([]byte, 5+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	copy(buf[5:], payload)
	_, err := w.Write(buf)
	return err
}

// ReadFrame reads one frame. A clean end between frames is io.EOF; a frame
// cut short is io.ErrUnexpectedEOF; an oversized one an error.
func ReadFrame(r io.Reader) (typ byte, payload []byte, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:5])
	if n > MaxFramePayload {
		return 0, nil, fmt.Errorf("stream frame of %d bytes is over the %d limit", n, MaxFramePayload)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], payload, nil
}

// FrameWriter writes each Write as frames of one type (split at
// MaxFramePayload). It is not safe for concurrent use on its own: share a
// lock through w.
type FrameWriter struct {
	W    io.Writer
	Type byte
}

func (f FrameWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxFramePayload)]
		if err := WriteFrame(f.W, f.Type, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}
