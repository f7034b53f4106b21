package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// guardEnd is how reading a stream through the guard must end.
type guardEnd int

const (
	// endEOF: the stream ended at a frame boundary or inside a payload;
	// the reader sees io.EOF and everything passes.
	endEOF guardEnd = iota
	// endTruncated: the stream ended inside a header: a read error
	// (io.ErrUnexpectedEOF), not a protocol violation.
	endTruncated
	// endViolation: a header broke the rules: ErrProtocol, the
	// connection closed, nothing of that frame passed.
	endViolation
)

// guardModel is the guard's contract, written from the ttrpc frame layout
// independently of guard.go: it returns how many bytes of stream pass,
// how reading ends, and for a violation a word its error must contain.
func guardModel(stream []byte, max uint32) (passed int, end guardEnd, word string) {
	off := 0
	for {
		rest := stream[off:]
		switch {
		case len(rest) == 0:
			return off, endEOF, ""
		case len(rest) < frameHeaderLen:
			return off, endTruncated, ""
		}
		length := binary.BigEndian.Uint32(rest[0:4])
		id := binary.BigEndian.Uint32(rest[4:8])
		typ, flags := rest[8], rest[9]
		switch {
		case length > max:
			return off, endViolation, "exceeds"
		case typ != 0x2 && typ != 0x3: // only responses and stream data come from the guest
			return off, endViolation, "type"
		case id%2 == 0: // the host opens odd stream ids only; 0 is none
			return off, endViolation, "stream"
		case flags > 0x7: // remote closed, remote open, no data
			return off, endViolation, "flags"
		}
		if uint64(len(rest)) < uint64(frameHeaderLen)+uint64(length) {
			return len(stream), endEOF, "" // the stream ends inside the payload
		}
		off += frameHeaderLen + int(length)
	}
}

// smallFrames is a stream of legitimate guest frames, like validFrames but
// small: the fuzzer minimizes every input it finds, which is slow for
// large ones.
func smallFrames() []byte {
	var b []byte
	b = append(b, frame(1, frameTypeResp, 0, nil)...)
	b = append(b, frame(3, frameTypeData, 0x1, []byte("hello"))...)
	b = append(b, frame(5, frameTypeResp, 0x7, randomBytes(100, 1))...)
	b = append(b, frame(0xFFFFFFFF, frameTypeResp, 0, randomBytes(33, 2))...)
	return append(b, frame(7, frameTypeData, 0x2|0x4, nil)...)
}

// FuzzGuardConn reads arbitrary byte streams through the frame guard, as
// a guest's socket delivers them (in chunks of any size) into reads of any
// size. Invariants, against guardModel: valid frames pass byte for byte;
// the first bad header stops the stream before any byte of it, with an
// ErrProtocol naming the broken rule, the connection closed, and every
// later Read failing the same way; a stream cut inside a header is a read
// error and not a violation; no Read returns more than asked or bytes with
// an error.
func FuzzGuardConn(f *testing.F) {
	f.Add(smallFrames(), uint8(0), uint8(6), uint16(0))
	f.Add(smallFrames(), uint8(255), uint8(255), uint16(200))
	f.Add(header(MaxFrame+1, 1, frameTypeResp, 0), uint8(9), uint8(3), uint16(0))
	f.Add(append(frame(1, frameTypeResp, 0, []byte("ok")), header(1<<32-1, 3, frameTypeData, 0)...), uint8(1), uint8(1), uint16(0))
	f.Add(append(frame(1, frameTypeResp, 0, nil), frame(2, frameTypeResp, 0, nil)...), uint8(3), uint8(7), uint16(0))
	f.Add(frame(1, frameTypeRequest, 0, nil), uint8(0), uint8(0), uint16(0))
	f.Add(frame(5, frameTypeData, 0x8, []byte("x")), uint8(4), uint8(4), uint16(0))
	f.Add(append(frame(7, frameTypeResp, 0x7, []byte("abc")), 0, 0, 0), uint8(2), uint8(5), uint16(0))
	f.Add([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"), uint8(0), uint8(64), uint16(0))
	f.Fuzz(func(t *testing.T, stream []byte, chunk, readSize uint8, limit uint16) {
		if len(stream) > 4*maxFuzzInput {
			return
		}
		max := uint32(limit)
		if limit == 0 {
			max = MaxFrame
		}
		conn := newChunkConn(stream, 1+int(chunk))
		g := newGuardConn(conn, max)
		got, err := readInChunks(t, g, 1+int(readSize))

		passed, end, word := guardModel(stream, max)
		if !bytes.Equal(got, stream[:passed]) {
			t.Fatalf("reader got %d bytes %x, want the first %d of %x", len(got), got, passed, stream)
		}
		switch end {
		case endEOF, endTruncated:
			if end == endEOF && err != nil {
				t.Fatalf("a stream of valid frames failed: %v", err)
			}
			if end == endTruncated && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("a stream cut inside a header ended with %v, want io.ErrUnexpectedEOF", err)
			}
			if errors.Is(err, ErrProtocol) || g.Err() != nil || conn.isClosed() {
				t.Fatalf("valid framing taken for a violation: err=%v Err()=%v closed=%v", err, g.Err(), conn.isClosed())
			}
		case endViolation:
			requireProtocolError(t, err)
			if !strings.Contains(err.Error(), word) {
				t.Fatalf("violation error %q does not name the broken rule (%q)", err, word)
			}
			if !errors.Is(g.Err(), ErrProtocol) || !conn.isClosed() {
				t.Fatalf("after a violation: Err()=%v closed=%v, want ErrProtocol and closed", g.Err(), conn.isClosed())
			}
			if n, err := g.Read(make([]byte, 16)); n != 0 || !errors.Is(err, ErrProtocol) {
				t.Fatalf("Read after a violation = (%d, %v), want (0, ErrProtocol)", n, err)
			}
		}
	})
}

// FuzzReplyFrame answers a call of the real client with one arbitrary
// frame on the call's stream: any type, flags and envelope (the
// ttrpc.Response holding the status and the reply). Invariants: the call
// returns at once; a header the guard forbids fails it with ErrProtocol
// and closes the client (Err, Done); a well-framed reply succeeds exactly
// when its envelope and payload decode and its status is OK, with the
// decoded payload as the value; a failure status keeps its class.
func FuzzReplyFrame(f *testing.F) {
	for i, seed := range replySeeds() {
		env, err := proto.Marshal(&ttrpc.Response{Payload: seed})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i), uint8(frameTypeResp), uint8(0), env)
	}
	notFound, err := proto.Marshal(&ttrpc.Response{Status: status.New(codes.NotFound, "gone").Proto()})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(uint8(5), uint8(frameTypeResp), uint8(0), notFound)
	f.Add(uint8(0), uint8(frameTypeData), uint8(0x1), []byte{0x12, 0x00})
	f.Add(uint8(0), uint8(frameTypeRequest), uint8(0), []byte(nil))
	f.Add(uint8(3), uint8(frameTypeResp), uint8(0x10), []byte(nil))
	f.Add(uint8(1), uint8(frameTypeResp), uint8(0), []byte{0x0a, 0x05, 0x08})
	f.Fuzz(func(t *testing.T, sel, typ, flags uint8, envelope []byte) {
		if len(envelope) > maxFuzzInput {
			return
		}
		rc := replyCases[int(sel)%len(replyCases)]
		host, guest := net.Pipe()
		guestDone := make(chan struct{})
		go func() {
			defer close(guestDone)
			defer guest.Close()
			id, _, err := readFrame(guest)
			if err != nil {
				return
			}
			if _, err := guest.Write(append(header(uint32(len(envelope)), id, typ, flags), envelope...)); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, guest)
		}()
		c := newClient(host)
		t.Cleanup(func() {
			_ = c.Close()
			<-guestDone
		})
		ctx := fuzzCtx(t)
		got, err := rc.call(ctx, c)
		requireNoHang(t, ctx, err)
		if err != nil && !nilMessage(got) {
			t.Fatalf("%s failed (%v) and returned a value %s", rc.method, err, describe(got))
		}

		if typ != frameTypeResp && typ != frameTypeData || flags > 0x7 {
			requireProtocolError(t, err)
			requireProtocolError(t, c.Err())
			select {
			case <-c.Done():
			case <-time.After(fuzzCallTimeout):
				t.Fatal("Done not closed after a protocol violation")
			}
			return
		}
		if perr := c.Err(); perr != nil {
			t.Fatalf("a well-framed reply was taken for a protocol violation: %v", perr)
		}
		if typ == frameTypeData {
			if err == nil {
				t.Fatalf("%s: a stream data frame was taken for the reply %s", rc.method, describe(got))
			}
			return
		}
		var env ttrpc.Response
		want := rc.zero()
		switch {
		case proto.Unmarshal(envelope, &env) != nil || proto.Unmarshal(env.Payload, want) != nil:
			if err == nil {
				t.Fatalf("%s: undecodable reply %x returned %s", rc.method, envelope, describe(got))
			}
		case env.Status.GetCode() != int32(codes.OK):
			if code := codes.Code(env.Status.GetCode()); code <= codes.Unauthenticated {
				requireStatusClass(t, err, status.ErrorProto(env.Status))
			} else if err == nil {
				t.Fatalf("%s: failure status %v returned %s", rc.method, env.Status, describe(got))
			}
		default:
			if err != nil {
				t.Fatalf("%s: a reply that decodes failed the call: %v", rc.method, err)
			}
			if !proto.Equal(got, want) {
				t.Fatalf("%s: client decoded %s, guest sent %s", rc.method, describe(got), describe(want))
			}
		}
	})
}
