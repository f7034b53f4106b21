package agent

import (
	"bytes"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// guestStep is one scripted answer of a polled method: a raw reply, or a
// failure status when fail is set.
type guestStep struct {
	reply []byte
	fail  error
}

// maxSteps bounds a script: the helpers poll at most this many times
// before the scripted guest gives its final answer.
const maxSteps = 32

// parseScript splits fuzz bytes into answers. Each starts with a byte h:
// below 0xf0, a reply of the h bytes that follow (fewer at the end); from
// 0xf0, a failure status with code h-0xef (1 to 16).
func parseScript(b []byte) []guestStep {
	var steps []guestStep
	for len(b) > 0 && len(steps) < maxSteps {
		h := int(b[0])
		b = b[1:]
		if h >= 0xf0 {
			steps = append(steps, guestStep{fail: status.Error(codes.Code(h-0xef), "scripted failure")})
			continue
		}
		n := min(h, len(b))
		steps = append(steps, guestStep{reply: b[:n]})
		b = b[n:]
	}
	return steps
}

// script encodes steps for the seeds: replies are messages, failures codes.
func script(t testing.TB, steps ...any) []byte {
	var b []byte
	for _, s := range steps {
		switch s := s.(type) {
		case codes.Code:
			b = append(b, byte(0xef+s))
		case proto.Message:
			p := mustMarshal(t, s)
			b = append(append(b, byte(len(p))), p...)
		}
	}
	return b
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatalf("marshal %T: %v", m, err)
	}
	return b
}

// oversized is a ReadStdio reply with one byte more than ChunkSize, under
// MaxFrame.
var oversized = sync.OnceValue(func() []byte {
	b, err := proto.Marshal(&api.ReadStdioResponse{Data: make([]byte, ChunkSize+1)})
	if err != nil {
		panic(err)
	}
	return b
})

// chunkWriter records what it is given, and counts empty writes.
type chunkWriter struct {
	bytes.Buffer
	empty int
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		w.empty++
	}
	return w.Buffer.Write(p)
}

// FuzzCopyOutput scripts the guest's answers to CopyOutput's polls; once
// the script is done the guest ends the stream, or sends one byte over
// ChunkSize when big. Invariants: CopyOutput writes exactly the data of
// the answers up to the first with eof, in order, never an empty write,
// and returns its length; it acknowledges by offset exactly what it wrote;
// it polls again only after an answer without eof; an undecodable answer
// or a failure status (even the guest's DeadlineExceeded: only the host's
// own deadline is retried) ends it with an error that keeps the guest's
// class, and an oversized answer with ErrProtocol and the client closed.
func FuzzCopyOutput(f *testing.F) {
	f.Add(script(f, &api.ReadStdioResponse{Data: []byte("hello ")}, &api.ReadStdioResponse{},
		&api.ReadStdioResponse{Data: []byte("world\n"), Eof: true}), false)
	f.Add(script(f, &api.ReadStdioResponse{Data: []byte("a")}, codes.DeadlineExceeded), false)
	f.Add(script(f, &api.ReadStdioResponse{Data: []byte("x")}), true)
	f.Add(script(f, &api.ReadStdioResponse{Data: []byte("a")}, codes.NotFound), false)
	f.Add([]byte{3, 0x0a, 0x05, 'a'}, false)
	f.Fuzz(func(t *testing.T, raw []byte, big bool) {
		if len(raw) > maxFuzzInput {
			return
		}
		steps := parseScript(raw)
		var (
			mu   sync.Mutex
			reqs []*api.ReadStdioRequest
		)
		c := scriptedClient(t, func(_ string, req []byte) ([]byte, error) {
			var r api.ReadStdioRequest
			if err := proto.Unmarshal(req, &r); err != nil {
				return nil, err
			}
			mu.Lock()
			i := len(reqs)
			reqs = append(reqs, &r)
			mu.Unlock()
			switch {
			case i < len(steps):
				return steps[i].reply, steps[i].fail
			case big:
				return oversized(), nil
			}
			return mustMarshal(t, &api.ReadStdioResponse{Eof: true}), nil
		}, "ReadStdio")
		ctx := fuzzCtx(t)
		w := &chunkWriter{}
		n, err := c.CopyOutput(ctx, testID, testExecID, api.StdioStream_STDERR, w)
		requireNoHang(t, ctx, err)

		// The model: what the guest's answers promise.
		var (
			want    []byte
			offsets []uint64 // the offset each poll must acknowledge
			end     = endOK
			fail    error
		)
	model:
		for i := 0; ; i++ {
			offsets = append(offsets, uint64(len(want)))
			if i >= len(steps) {
				if big {
					end = endProtocol
				}
				break
			}
			if fail = steps[i].fail; fail != nil {
				end = endStatus
				break
			}
			var m api.ReadStdioResponse
			switch {
			case proto.Unmarshal(steps[i].reply, &m) != nil:
				end = endDecode
				break model
			case m.Eof:
				want = append(want, m.Data...)
				break model
			}
			want = append(want, m.Data...)
		}

		requireEnding(t, c, err, end, fail)
		if n != int64(len(want)) || !bytes.Equal(w.Bytes(), want) {
			t.Fatalf("CopyOutput returned %d and wrote %q, want %d bytes %q", n, w.Bytes(), len(want), want)
		}
		if w.empty != 0 {
			t.Fatalf("CopyOutput made %d empty writes", w.empty)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(reqs) != len(offsets) {
			t.Fatalf("CopyOutput polled %d times, want %d", len(reqs), len(offsets))
		}
		for i, r := range reqs {
			if r.Offset != offsets[i] || r.Max != ChunkSize || r.Id != testID || r.ExecId != testExecID || r.Stream != api.StdioStream_STDERR {
				t.Fatalf("poll %d was %v, want offset %d of %s/%s stderr, at most %d bytes", i, r, offsets[i], testID, testExecID, ChunkSize)
			}
		}
	})
}

// FuzzCopyInput scripts the guest's answers to CopyInput's writes of
// input; once the script is done the guest takes everything, and answers
// CloseStdin with closeCode's status (0: OK). Invariants: each write
// starts at the offset the guest last reported and carries the rest of
// input; an answer that moves the offset backwards or past what was sent
// is ErrProtocol and closes the client; one that does not move it is
// ErrFailedPrecondition; stdin is closed once, after everything was
// written, and a NotFound from CloseStdin is success; CopyInput returns
// the bytes the guest took.
func FuzzCopyInput(f *testing.F) {
	f.Add(script(f, &api.WriteStdinResponse{Written: 3}, &api.WriteStdinResponse{Written: 5}), []byte("hello"), uint8(0))
	f.Add(script(f, &api.WriteStdinResponse{Written: 1}, codes.DeadlineExceeded), []byte("hello"), uint8(0))
	f.Add(script(f, &api.WriteStdinResponse{Written: 9}), []byte("hello"), uint8(0))
	f.Add(script(f, &api.WriteStdinResponse{Written: 2}, &api.WriteStdinResponse{Written: 2}), []byte("hello"), uint8(0))
	f.Add([]byte(nil), []byte("hi"), uint8(codes.NotFound))
	f.Add([]byte(nil), []byte(nil), uint8(codes.Internal))
	f.Fuzz(func(t *testing.T, raw, input []byte, closeCode uint8) {
		if len(raw) > maxFuzzInput || len(input) > maxFuzzInput {
			return // (and CopyInput reads input at once, as the model assumes)
		}
		steps := parseScript(raw)
		closeFail := guestStatus(closeCode, "scripted close failure")
		var (
			mu     sync.Mutex
			writes []*api.WriteStdinRequest
			closes int
			order  []string
		)
		c := scriptedClient(t, func(method string, req []byte) ([]byte, error) {
			mu.Lock()
			defer mu.Unlock()
			order = append(order, method)
			if method == "CloseStdin" {
				closes++
				return nil, closeFail
			}
			var r api.WriteStdinRequest
			if err := proto.Unmarshal(req, &r); err != nil {
				return nil, err
			}
			i := len(writes)
			writes = append(writes, &r)
			if i < len(steps) {
				return steps[i].reply, steps[i].fail
			}
			return mustMarshal(t, &api.WriteStdinResponse{Written: r.Offset + uint64(len(r.Data))}), nil
		}, "WriteStdin", "CloseStdin")
		ctx := fuzzCtx(t)
		n, err := c.CopyInput(ctx, testID, testExecID, bytes.NewReader(input))
		requireNoHang(t, ctx, err)

		var (
			off     uint64
			offsets []uint64 // the offset each write must start at
			end     = endOK
			fail    error
		)
		size := uint64(len(input))
	model:
		for i := 0; off < size; i++ {
			offsets = append(offsets, off)
			if i >= len(steps) {
				off = size
				break
			}
			if fail = steps[i].fail; fail != nil {
				end = endStatus
				break
			}
			var m api.WriteStdinResponse
			switch {
			case proto.Unmarshal(steps[i].reply, &m) != nil:
				end = endDecode
				break model
			case m.Written == off:
				end = endNoProgress
				break model
			case m.Written < off || m.Written > size:
				end = endProtocol
				break model
			}
			off = m.Written
		}
		wantCloses := 0
		if end == endOK {
			wantCloses = 1
			if closeFail != nil && status.Code(closeFail) != codes.NotFound {
				end, fail = endStatus, closeFail
			}
		}

		requireEnding(t, c, err, end, fail)
		if n != int64(off) {
			t.Fatalf("CopyInput returned %d, want %d", n, off)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(writes) != len(offsets) || closes != wantCloses {
			t.Fatalf("CopyInput wrote %d times and closed %d, want %d and %d", len(writes), closes, len(offsets), wantCloses)
		}
		if closes == 1 && order[len(order)-1] != "CloseStdin" {
			t.Fatalf("stdin closed before the last write: %q", order)
		}
		for i, r := range writes {
			if r.Offset != offsets[i] || !bytes.Equal(r.Data, input[offsets[i]:]) || r.Id != testID || r.ExecId != testExecID {
				t.Fatalf("write %d was at %d with %d bytes, want at %d with the %d left", i, r.Offset, len(r.Data), offsets[i], size-offsets[i])
			}
		}
	})
}

// FuzzWait scripts the guest's answers to Wait's polls; once the script
// is done the guest reports an exit. Invariants: Wait returns the first
// answer that says exited, as it came; it polls again only after an
// answer that does not; an undecodable answer or a failure status ends it
// with an error (the status's class intact) and no value.
func FuzzWait(f *testing.F) {
	f.Add(script(f, &api.WaitProcessResponse{}, &api.WaitProcessResponse{ExitStatus: 1},
		&api.WaitProcessResponse{Exited: true, ExitStatus: 137, OomKilled: true, ExitedAtUnixNs: -1}))
	f.Add(script(f, &api.WaitProcessResponse{}, codes.DeadlineExceeded))
	f.Add(script(f, &api.WaitProcessResponse{ExitStatus: 3}, codes.NotFound))
	f.Add([]byte{2, 0x08, 0x02})
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) > maxFuzzInput {
			return
		}
		steps := parseScript(raw)
		final := &api.WaitProcessResponse{Exited: true, ExitStatus: 255, ExitedAtUnixNs: 1}
		var (
			mu   sync.Mutex
			reqs []*api.WaitProcessRequest
		)
		c := scriptedClient(t, func(_ string, req []byte) ([]byte, error) {
			var r api.WaitProcessRequest
			if err := proto.Unmarshal(req, &r); err != nil {
				return nil, err
			}
			mu.Lock()
			i := len(reqs)
			reqs = append(reqs, &r)
			mu.Unlock()
			if i < len(steps) {
				return steps[i].reply, steps[i].fail
			}
			return mustMarshal(t, final), nil
		}, "WaitProcess")
		ctx := fuzzCtx(t)
		got, err := c.Wait(ctx, testID, testExecID)
		requireNoHang(t, ctx, err)

		var (
			want  = final
			polls = len(steps) + 1
			end   = endOK
			fail  error
		)
		for i, s := range steps {
			var m api.WaitProcessResponse
			if fail = s.fail; fail != nil {
				end, polls = endStatus, i+1
				break
			}
			if proto.Unmarshal(s.reply, &m) != nil {
				end, polls = endDecode, i+1
				break
			}
			if m.Exited {
				want, polls = &m, i+1
				break
			}
		}

		requireEnding(t, c, err, end, fail)
		if end == endOK && !proto.Equal(got, want) || end != endOK && got != nil {
			t.Fatalf("Wait returned %v, want %v", got, want)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(reqs) != polls {
			t.Fatalf("Wait polled %d times, want %d", len(reqs), polls)
		}
		for i, r := range reqs {
			if r.Id != testID || r.ExecId != testExecID || r.WaitMs == 0 {
				t.Fatalf("poll %d was %v", i, r)
			}
		}
	})
}
