package logfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Stream is the output stream a frame's data was written to.
type Stream uint8

// The streams of a log, as stored in a frame's first byte.
const (
	Stdout Stream = 1
	Stderr Stream = 2
)

// String returns "stdout" or "stderr", or "stream(N)" for an unknown byte.
func (s Stream) String() string {
	switch s {
	case Stdout:
		return "stdout"
	case Stderr:
		return "stderr"
	}
	return fmt.Sprintf("stream(%d)", uint8(s))
}

// valid reports whether s is a stream a log may hold.
func (s Stream) valid() bool { return s == Stdout || s == Stderr }

// Frame is one chunk of a log: data written to one stream at one time.
type Frame struct {
	// Stream is the stream Data was written to.
	Stream Stream
	// Time is when the writer stamped the frame (the wall clock, with
	// nanosecond precision).
	Time time.Time
	// Data is the chunk written.
	Data []byte
}

// Frame sizes.
const (
	// MaxFrame is the most data a writer puts in one frame; a larger
	// write is split.
	MaxFrame = 32 << 10
	// maxReadFrame is the most data a reader accepts in one frame: a
	// longer one is taken for corruption rather than read into memory.
	maxReadFrame = 1 << 20
	// headerSize is the size of a frame's header: stream, time, length.
	headerSize = 1 + 8 + 4
)

// ErrCorrupt is wrapped by the error of a read that found something other
// than a frame where one should start.
var ErrCorrupt = errors.New("corrupt log")

// appendHeader appends the header of a frame of n bytes of s's data,
// stamped t, to b.
func appendHeader(b []byte, s Stream, t time.Time, n int) []byte {
	b = append(b, byte(s))
	b = binary.BigEndian.AppendUint64(b, uint64(t.UnixNano()))
	return binary.BigEndian.AppendUint32(b, uint32(n))
}

// parseHeader decodes a frame header from the first headerSize bytes of b.
func parseHeader(b []byte) (s Stream, t time.Time, n uint32) {
	s = Stream(b[0])
	t = time.Unix(0, int64(binary.BigEndian.Uint64(b[1:9])))
	return s, t, binary.BigEndian.Uint32(b[9:headerSize])
}
