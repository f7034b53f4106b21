package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

const (
	testID     = "c1"
	testExecID = "e1"
)

// loss says how a fake guest loses the answer to a long poll.
type loss int

const (
	// lossNone answers at once.
	lossNone loss = iota
	// lossDropped never answers: the call blocks until the guest's deadline.
	lossDropped
	// lossLate answers only after the host gave up and retried, with the
	// bytes it would have sent: the host must ignore them.
	lossLate
)

// outputGuest serves data through ReadStdio by offset, like the guest's
// outStream: a call returns up to max bytes from its offset, and eof once
// they reach the end of data.
type outputGuest struct {
	// data is the stream.
	data []byte
	// sizes are the reply sizes, used in turn and capped by max and by what
	// is left; a size of 0 is an empty reply (a long poll that timed out).
	sizes []int
	// lateEOF reports eof only on a call made at the end of data, after the
	// last bytes were acknowledged.
	lateEOF bool
	// stream is the stream the host must ask for.
	stream api.StdioStream
	// waitMs is the wait_ms the host must send.
	waitMs uint32
	// mode and lose pick the calls whose answers get lost.
	mode loss
	lose func(call int) bool
	// stop releases answers held by lossLate at test end.
	stop chan struct{}

	// mu guards the fields below.
	mu sync.Mutex
	// calls counts ReadStdio calls. Guarded by mu.
	calls int
	// acked is the highest offset the host asked for. Guarded by mu.
	acked uint64
	// retries counts calls repeating the previous offset. Guarded by mu.
	retries int
	// eofSent says an answer with eof was sent (not lost): the host must not
	// poll again. Guarded by mu.
	eofSent bool
	// waiting holds, by offset, the late answers waiting for their retry.
	// Guarded by mu.
	waiting map[uint64]chan struct{}
	// errs are contract violations by the host. Guarded by mu.
	errs []string
}

func newOutputGuest(t testing.TB, data []byte, sizes []int) *outputGuest {
	t.Helper()
	g := &outputGuest{
		data: data, sizes: sizes, waitMs: uint32(pollWait.Milliseconds()),
		stop: make(chan struct{}), waiting: map[uint64]chan struct{}{},
	}
	t.Cleanup(func() {
		close(g.stop)
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, e := range g.errs {
			t.Errorf("host broke the ReadStdio contract: %s", e)
		}
	})
	return g
}

func (g *outputGuest) ReadStdio(ctx context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
	g.mu.Lock()
	call := g.calls
	g.calls++
	if req.Id != testID || req.ExecId != testExecID || req.Stream != g.stream || req.Max != ChunkSize || req.WaitMs != g.waitMs {
		g.errs = append(g.errs, fmt.Sprintf("call %d: unexpected request %v", call, req))
	}
	if g.eofSent {
		g.errs = append(g.errs, fmt.Sprintf("call %d: poll after eof was delivered", call))
	}
	off := req.Offset
	switch {
	case off < g.acked:
		g.errs = append(g.errs, fmt.Sprintf("call %d: offset %d went back before %d", call, off, g.acked))
	case off > uint64(len(g.data)):
		g.errs = append(g.errs, fmt.Sprintf("call %d: offset %d beyond the %d-byte stream", call, off, len(g.data)))
		g.mu.Unlock()
		return nil, errors.New("offset beyond the stream")
	case call > 0 && off == g.acked:
		g.retries++
	}
	g.acked = max(g.acked, off)
	if ch, ok := g.waiting[off]; ok && call > 0 {
		close(ch)
		delete(g.waiting, off)
	}
	n := len(g.data) - int(off)
	if len(g.sizes) > 0 {
		n = min(n, g.sizes[call%len(g.sizes)])
	}
	n = min(n, int(req.Max))
	resp := &api.ReadStdioResponse{Data: g.data[off : off+uint64(n)], Eof: off+uint64(n) == uint64(len(g.data))}
	if g.lateEOF && n > 0 {
		resp.Eof = false
	}
	mode := lossNone
	var retried chan struct{}
	if g.lose != nil && g.lose(call) {
		mode = g.mode
		if mode == lossLate {
			retried = make(chan struct{})
			g.waiting[off] = retried
		}
	}
	g.eofSent = g.eofSent || (mode == lossNone && resp.Eof)
	g.mu.Unlock()

	switch mode {
	case lossDropped:
		<-ctx.Done()
		return nil, ctx.Err()
	case lossLate:
		select {
		case <-retried:
		case <-g.stop:
		}
	}
	return resp, nil
}

func (g *outputGuest) stats() (calls, retries int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls, g.retries
}

// Verified two-sided: with CopyOutput heeding eof only on an empty reply it
// polls again after the end and the guest reports it.
func TestCopyOutputMovesWholeStreamIntoSlowWriter(t *testing.T) {
	data, sum := testStream()
	tests := []struct {
		name    string
		data    []byte
		sizes   []int
		lateEOF bool
		stream  api.StdioStream
	}{
		{name: "varying chunk sizes", data: data, sizes: []int{1, 4093, ChunkSize, 0, 65536, 7, ChunkSize - 1, 300000}},
		{name: "full chunks", data: data, sizes: []int{ChunkSize}},
		{name: "eof on an empty reply", data: data, sizes: []int{ChunkSize/2 + 3}, lateEOF: true},
		{name: "stderr", data: data, sizes: []int{ChunkSize, 777777}, stream: api.StdioStream_STDERR},
		{name: "empty stream", data: nil},
		{name: "empty stream with eof on an empty reply", data: nil, lateEOF: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			g := newOutputGuest(t, tt.data, tt.sizes)
			g.lateEOF, g.stream = tt.lateEOF, tt.stream
			c := startClient(t, &fakeAgent{readStdio: g.ReadStdio})

			w := newHashWriter(3, time.Millisecond)
			n, err := c.CopyOutput(context.Background(), testID, testExecID, tt.stream, w)
			if err != nil {
				t.Fatalf("CopyOutput: %v", err)
			}
			want := sum
			if len(tt.data) != streamSize {
				want = sha256.Sum256(tt.data)
			}
			if n != int64(len(tt.data)) || w.n != n {
				t.Fatalf("CopyOutput returned %d and wrote %d bytes, want %d", n, w.n, len(tt.data))
			}
			if w.sum() != want {
				t.Fatal("bytes written differ from the stream")
			}
			if w.maxWrite > ChunkSize || w.empty > 0 {
				t.Fatalf("writes: largest %d bytes, %d empty", w.maxWrite, w.empty)
			}
		})
	}
}

// A poll whose answer never comes (or comes after the host gave up) is
// retried at the same offset; the late answer is ignored, so no byte is lost
// or written twice.
//
// Verified two-sided: with CopyOutput returning on the poll's deadline both
// cases fail; with a retry stepping the offset back one byte (a duplicated
// byte) the hash differs. Without the deadline normalisation in
// deadlineInterceptor "answer dropped" failed 7 runs in 10: the guest's own
// "deadline exceeded" beat the host's and CopyOutput gave up.
func TestCopyOutputRetriesLostPollsWithoutDuplicating(t *testing.T) {
	data, sum := testStream()
	lost := map[int]bool{1: true, 4: true, 5: true} // 4 and 5: the retry is lost too
	for _, mode := range []struct {
		name string
		loss loss
	}{{"answer dropped", lossDropped}, {"answer arrives after the retry", lossLate}} {
		t.Run(mode.name, func(t *testing.T) {
			checkLeaks(t)
			shortenPolls(t, 20*time.Millisecond, 80*time.Millisecond)
			g := newOutputGuest(t, data, []int{ChunkSize/3 + 1, ChunkSize, 12345})
			g.mode, g.lose = mode.loss, func(call int) bool { return lost[call] }
			c := startClient(t, &fakeAgent{readStdio: g.ReadStdio})

			w := newHashWriter(5, time.Millisecond)
			n, err := c.CopyOutput(context.Background(), testID, testExecID, api.StdioStream_STDOUT, w)
			if err != nil {
				t.Fatalf("CopyOutput: %v", err)
			}
			if n != streamSize || w.n != streamSize || w.sum() != sum {
				t.Fatalf("CopyOutput moved %d bytes (writer got %d), want the exact %d-byte stream", n, w.n, streamSize)
			}
			if _, retries := g.stats(); retries < len(lost) {
				t.Fatalf("guest saw %d retries, want at least %d", retries, len(lost))
			}
			if c.Err() != nil {
				t.Fatalf("Err() = %v after lost answers", c.Err())
			}
		})
	}
}

// A chunk larger than asked for is a protocol violation, whether the guard
// catches it (over MaxFrame) or CopyOutput does (under MaxFrame).
//
// Verified two-sided: without CopyOutput's length check the first case
// writes the chunk and fails; without recording the violation for Err (the
// fix in Client.fail) the first case's Err() is nil; retrying every error
// spins the second case until the watchdog.
func TestCopyOutputRejectsOversizedChunk(t *testing.T) {
	tests := []struct {
		name string
		size int
	}{
		{"one byte over ChunkSize, under MaxFrame", ChunkSize + 1},
		{"over MaxFrame", 2 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			big := make([]byte, tt.size)
			var calls atomic.Int32
			c := startClient(t, &fakeAgent{readStdio: func(_ context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
				if calls.Add(1) == 1 {
					return &api.ReadStdioResponse{Data: big[:100]}, nil
				}
				return &api.ReadStdioResponse{Data: big}, nil
			}})

			w := newHashWriter(0, 0)
			var (
				n   int64
				err error
			)
			within(t, 5*time.Second, func() {
				n, err = c.CopyOutput(context.Background(), testID, testExecID, api.StdioStream_STDOUT, w)
			})
			requireProtocolError(t, err)
			if n != 100 || w.n != 100 {
				t.Fatalf("CopyOutput returned %d and wrote %d bytes, want only the 100 valid ones", n, w.n)
			}
			waitClosed(t, c.Done(), 2*time.Second, "Done")
			requireProtocolError(t, c.Err())
			_, err = c.State(context.Background(), &api.ContainerRequest{Id: testID})
			requireProtocolError(t, err)
		})
	}
}

// Verified two-sided: retrying every failed poll fails every case but the
// writer's; retrying a poll timeout without checking the caller's ctx spins
// "caller deadline passes" until the watchdog; ignoring the writer's error
// fails "writer error".
func TestCopyOutputReturnsErrors(t *testing.T) {
	errGuest := errors.New("stdout pipe exploded")
	errWrite := errors.New("disk full")
	tests := []struct {
		name string
		// guest serves call number call; cancel cancels the caller's ctx.
		guest   func(ctx context.Context, call int, cancel context.CancelFunc) (*api.ReadStdioResponse, error)
		w       io.Writer
		timeout time.Duration // caller deadline; 0: none
		wantIs  error
		wantMsg string
		wantN   int64
		// healthy says the connection must survive the error.
		healthy bool
	}{
		{
			name: "guest error",
			guest: func(_ context.Context, call int, _ context.CancelFunc) (*api.ReadStdioResponse, error) {
				if call == 0 {
					return &api.ReadStdioResponse{Data: make([]byte, 100)}, nil
				}
				return nil, errGuest
			},
			wantMsg: errGuest.Error(), wantN: 100, healthy: true,
		},
		{
			name: "writer error",
			guest: func(context.Context, int, context.CancelFunc) (*api.ReadStdioResponse, error) {
				return &api.ReadStdioResponse{Data: make([]byte, 100)}, nil
			},
			w:      writerFunc(func([]byte) (int, error) { return 0, errWrite }),
			wantIs: errWrite, wantMsg: "write STDOUT output", wantN: 0, healthy: true,
		},
		{
			name: "caller cancels during a poll",
			guest: func(ctx context.Context, call int, cancel context.CancelFunc) (*api.ReadStdioResponse, error) {
				if call == 0 {
					return &api.ReadStdioResponse{Data: make([]byte, 100)}, nil
				}
				cancel()
				<-ctx.Done()
				return nil, ctx.Err()
			},
			wantIs: context.Canceled, wantN: 100, healthy: true,
		},
		{
			// The poll's own deadline (20 s) is far off: the caller's ends it.
			name: "caller deadline passes during a poll",
			guest: func(ctx context.Context, call int, _ context.CancelFunc) (*api.ReadStdioResponse, error) {
				if call == 0 {
					return &api.ReadStdioResponse{Data: make([]byte, 100)}, nil
				}
				<-ctx.Done()
				return nil, ctx.Err()
			},
			timeout: 200 * time.Millisecond,
			wantIs:  context.DeadlineExceeded, wantN: 100, healthy: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.timeout > 0 {
				ctx, cancel = context.WithTimeout(ctx, tt.timeout)
				defer cancel()
			}
			var calls atomic.Int32
			c := startClient(t, &fakeAgent{readStdio: func(sctx context.Context, _ *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
				return tt.guest(sctx, int(calls.Add(1)-1), cancel)
			}})
			w := tt.w
			if w == nil {
				w = io.Discard
			}
			var (
				n   int64
				err error
			)
			within(t, 3*time.Second, func() {
				n, err = c.CopyOutput(ctx, testID, testExecID, api.StdioStream_STDOUT, w)
			})
			if err == nil {
				t.Fatal("CopyOutput succeeded")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
			if n != tt.wantN {
				t.Fatalf("CopyOutput returned %d bytes, want %d", n, tt.wantN)
			}
			if tt.healthy {
				if errors.Is(err, ErrProtocol) || c.Err() != nil {
					t.Fatalf("ordinary error classified as a protocol violation: %v / %v", err, c.Err())
				}
				if _, err := c.Ping(context.Background(), &api.PingRequest{}); err != nil {
					t.Fatalf("connection broken by an ordinary error: %v", err)
				}
			}
		})
	}
}

// writerFunc adapts a function to io.Writer.
type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// inputGuest plays the guest's stdin stream (pkg/guest inStream): a write
// at offset skips the bytes it already has and takes as many of the rest as
// accept says; CloseStdin is recorded.
type inputGuest struct {
	// accept returns how many of n new bytes call takes (clamped to 1..n);
	// nil takes them all.
	accept func(call, n int) int
	// reply, when set, replaces the honest written offset of an answer.
	reply func(call int, req *api.WriteStdinRequest, written uint64) uint64

	// mu guards the fields below.
	mu sync.Mutex
	// got is the stdin received so far. Guarded by mu.
	got []byte
	// calls counts WriteStdin calls. Guarded by mu.
	calls int
	// retries counts writes that started before the bytes already had.
	// Guarded by mu.
	retries int
	// closes counts CloseStdin calls; closedAt is len(got) at the first.
	// Guarded by mu.
	closes, closedAt int
	// errs are contract violations by the host. Guarded by mu.
	errs []string
}

func newInputGuest(t testing.TB) *inputGuest {
	t.Helper()
	g := &inputGuest{}
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, e := range g.errs {
			t.Errorf("host broke the WriteStdin contract: %s", e)
		}
	})
	return g
}

func (g *inputGuest) WriteStdin(_ context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	call := g.calls
	g.calls++
	if req.Id != testID || req.ExecId != testExecID {
		g.errs = append(g.errs, fmt.Sprintf("call %d: unexpected ids %q %q", call, req.Id, req.ExecId))
	}
	if g.closes > 0 {
		g.errs = append(g.errs, fmt.Sprintf("call %d: write after CloseStdin", call))
	}
	if len(req.Data) == 0 || len(req.Data) > ChunkSize {
		g.errs = append(g.errs, fmt.Sprintf("call %d: write of %d bytes", call, len(req.Data)))
	}
	have := uint64(len(g.got))
	if req.Offset > have {
		g.errs = append(g.errs, fmt.Sprintf("call %d: offset %d beyond the %d bytes written", call, req.Offset, have))
		return nil, errors.New("offset beyond the bytes written")
	}
	skip := min(have-req.Offset, uint64(len(req.Data)))
	if skip > 0 {
		g.retries++
		if !bytes.Equal(req.Data[:skip], g.got[req.Offset:req.Offset+skip]) {
			g.errs = append(g.errs, fmt.Sprintf("call %d: retried bytes at %d differ", call, req.Offset))
		}
	}
	fresh := req.Data[skip:]
	k := len(fresh)
	if g.accept != nil && k > 0 {
		k = min(max(g.accept(call, k), 1), k)
	}
	g.got = append(g.got, fresh[:k]...)
	written := uint64(len(g.got))
	if g.reply != nil {
		written = g.reply(call, req, written)
	}
	return &api.WriteStdinResponse{Written: written}, nil
}

func (g *inputGuest) CloseStdin(_ context.Context, req *api.CloseStdinRequest) (*api.Empty, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if req.Id != testID || req.ExecId != testExecID {
		g.errs = append(g.errs, fmt.Sprintf("CloseStdin: unexpected ids %q %q", req.Id, req.ExecId))
	}
	if g.closes == 0 {
		g.closedAt = len(g.got)
	}
	g.closes++
	return &api.Empty{}, nil
}

// lossyStdin forwards WriteStdin to the guest but, for the calls lose picks,
// discards the guest's answer and fails the call the way ttrpc fails a call
// whose deadline passed (context.DeadlineExceeded): the guest did the write,
// the host never heard. A real lost answer costs DefaultCallTimeout (30 s),
// too long for a unit test; the transport side of a lost answer is covered by
// TestCopyOutputRetriesLostPollsWithoutDuplicating.
type lossyStdin struct {
	api.AgentService
	// lose picks the calls whose answers are lost.
	lose func(call int) bool
	// calls counts WriteStdin calls.
	calls atomic.Int64
}

func (l *lossyStdin) WriteStdin(ctx context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
	call := int(l.calls.Add(1) - 1)
	resp, err := l.AgentService.WriteStdin(ctx, req)
	if err == nil && l.lose(call) {
		return nil, context.DeadlineExceeded
	}
	return resp, err
}

// shortWrites takes a varying part of each write: all, a third, one byte,
// all but one, 4 KiB.
func shortWrites(call, n int) int {
	switch call % 5 {
	case 0:
		return n
	case 1:
		return n / 3
	case 2:
		return 1
	case 3:
		return n - 1
	default:
		return 4096
	}
}

// Verified two-sided: returning on a lost answer instead of retrying fails
// the lossy cases; assuming every write is taken whole fails the short-write
// cases; skipping CloseStdin fails every case.
func TestCopyInputDeliversWholeStreamDespiteShortWritesAndLostAnswers(t *testing.T) {
	data, _ := testStream()
	tests := []struct {
		name   string
		data   []byte
		reader func(io.Reader) io.Reader
		accept func(call, n int) int
		lose   func(call int) bool
		// retries says the guest must see retried offsets.
		retries bool
	}{
		{name: "guest takes whole writes", data: data},
		{name: "short writes", data: data, accept: shortWrites},
		{name: "short writes and lost answers", data: data, accept: shortWrites,
			lose: func(call int) bool { return call%7 == 3 }, retries: true},
		{name: "answer lost after the guest took everything", data: data,
			lose: func(call int) bool { return call%3 == 0 }, retries: true},
		{name: "two answers lost in a row", data: data, accept: shortWrites,
			lose: func(call int) bool { return call%11 == 1 || call%11 == 2 }, retries: true},
		// iotest.DataErrReader reads 1 KiB at a time: 1 MiB keeps it fast.
		{name: "reader returns data with EOF", data: data[:1<<20+17], reader: iotest.DataErrReader},
		{name: "reader returns short reads", data: data, reader: iotest.HalfReader, accept: shortWrites},
		{name: "empty input", data: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			g := newInputGuest(t)
			g.accept = tt.accept
			c := startClient(t, &fakeAgent{writeStdin: g.WriteStdin, closeStdin: g.CloseStdin})
			if tt.lose != nil {
				c.AgentService = &lossyStdin{AgentService: c.AgentService, lose: tt.lose}
			}
			var r io.Reader = bytes.NewReader(tt.data)
			if tt.reader != nil {
				r = tt.reader(r)
			}

			n, err := c.CopyInput(context.Background(), testID, testExecID, r)
			if err != nil {
				t.Fatalf("CopyInput: %v", err)
			}
			g.mu.Lock()
			defer g.mu.Unlock()
			if n != int64(len(tt.data)) || !bytes.Equal(g.got, tt.data) {
				t.Fatalf("CopyInput returned %d, guest got %d bytes: want the exact %d-byte stream", n, len(g.got), len(tt.data))
			}
			if g.closes != 1 || g.closedAt != len(tt.data) {
				t.Fatalf("CloseStdin called %d times, first after %d bytes; want once after %d", g.closes, g.closedAt, len(tt.data))
			}
			if tt.retries && g.retries == 0 {
				t.Fatal("no retried write reached the guest")
			}
		})
	}
}

// Verified two-sided: without the lower bound of CopyInput's offset check
// the backwards cases fail; without the upper bound CopyInput panics
// (slice bounds out of range: an untrusted guest could crash the host);
// without recording the violation (Client.fail) Err() is nil.
func TestCopyInputRejectsBadOffsets(t *testing.T) {
	data, _ := testStream()
	tests := []struct {
		name  string
		reply func(req *api.WriteStdinRequest, honest uint64) uint64
	}{
		{"offset moved backwards", func(req *api.WriteStdinRequest, _ uint64) uint64 { return req.Offset - 1 }},
		{"offset moved back to zero", func(*api.WriteStdinRequest, uint64) uint64 { return 0 }},
		{"offset one beyond the data sent", func(req *api.WriteStdinRequest, _ uint64) uint64 {
			return req.Offset + uint64(len(req.Data)) + 1
		}},
		{"offset at the largest uint64", func(*api.WriteStdinRequest, uint64) uint64 { return math.MaxUint64 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			g := newInputGuest(t)
			g.accept = func(int, int) int { return 1000 }
			g.reply = func(call int, req *api.WriteStdinRequest, honest uint64) uint64 {
				if call < 2 {
					return honest
				}
				return tt.reply(req, honest)
			}
			c := startClient(t, &fakeAgent{writeStdin: g.WriteStdin, closeStdin: g.CloseStdin})

			var (
				n   int64
				err error
			)
			within(t, 5*time.Second, func() {
				n, err = c.CopyInput(context.Background(), testID, testExecID, bytes.NewReader(data))
			})
			requireProtocolError(t, err)
			if n != 2000 {
				t.Fatalf("CopyInput returned %d, want the 2000 bytes acknowledged before the violation", n)
			}
			waitClosed(t, c.Done(), 2*time.Second, "Done")
			requireProtocolError(t, c.Err())
			g.mu.Lock()
			defer g.mu.Unlock()
			if g.closes != 0 {
				t.Fatal("CloseStdin called after a protocol violation")
			}
		})
	}
}

// Verified two-sided: retrying every failed write fails "guest write error"
// and spins "caller ctx cancelled"; ignoring the reader's or CloseStdin's
// error fails the matching case.
func TestCopyInputReturnsErrors(t *testing.T) {
	errGuest := errors.New("stdin pipe exploded")
	errRead := errors.New("terminal gone")
	data := make([]byte, 5000)
	tests := []struct {
		name       string
		reader     io.Reader
		writeErr   func(call int) error
		closeErr   error
		cancelled  bool
		wantIs     error
		wantMsg    string
		wantN      int64
		wantCloses int
	}{
		{
			name:   "guest write error",
			reader: bytes.NewReader(data),
			writeErr: func(call int) error {
				if call == 1 {
					return errGuest
				}
				return nil
			},
			wantMsg: errGuest.Error(), wantN: 1000,
		},
		{
			name:    "reader error",
			reader:  io.MultiReader(bytes.NewReader(data[:1500]), iotest.ErrReader(errRead)),
			wantIs:  errRead,
			wantMsg: "read stdin", wantN: 1500,
		},
		{
			name:     "CloseStdin error",
			reader:   bytes.NewReader(data),
			closeErr: errGuest,
			wantMsg:  errGuest.Error(), wantN: int64(len(data)), wantCloses: 1,
		},
		{
			name:      "caller ctx cancelled",
			reader:    bytes.NewReader(data),
			cancelled: true,
			wantIs:    context.Canceled,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			g := newInputGuest(t)
			g.accept = func(int, int) int { return 1000 }
			var calls, closes atomic.Int32
			c := startClient(t, &fakeAgent{
				writeStdin: func(ctx context.Context, req *api.WriteStdinRequest) (*api.WriteStdinResponse, error) {
					call := int(calls.Add(1) - 1)
					if tt.writeErr != nil {
						if err := tt.writeErr(call); err != nil {
							return nil, err
						}
					}
					return g.WriteStdin(ctx, req)
				},
				closeStdin: func(ctx context.Context, req *api.CloseStdinRequest) (*api.Empty, error) {
					closes.Add(1)
					if tt.closeErr != nil {
						return nil, tt.closeErr
					}
					return g.CloseStdin(ctx, req)
				},
			})
			ctx, cancel := context.WithCancel(context.Background())
			if tt.cancelled {
				cancel()
			}
			defer cancel()

			var (
				n   int64
				err error
			)
			within(t, 3*time.Second, func() {
				n, err = c.CopyInput(ctx, testID, testExecID, tt.reader)
			})
			if err == nil {
				t.Fatal("CopyInput succeeded")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
			if errors.Is(err, ErrProtocol) || c.Err() != nil {
				t.Fatalf("ordinary error classified as a protocol violation: %v / %v", err, c.Err())
			}
			if n != tt.wantN {
				t.Fatalf("CopyInput returned %d, want %d", n, tt.wantN)
			}
			if got := int(closes.Load()); got != tt.wantCloses {
				t.Fatalf("CloseStdin called %d times, want %d", got, tt.wantCloses)
			}
		})
	}
}

// Verified two-sided: returning the first answer whether exited or not fails
// the cases with empty polls; not retrying a timed-out poll fails the
// lost-poll cases.
func TestWaitPollsUntilExited(t *testing.T) {
	tests := []struct {
		name string
		// running is how many polls answer "not exited yet".
		running int
		// lostFirst loses the first poll's answer (shortened polls).
		lostFirst bool
	}{
		{name: "exited at once"},
		{name: "after three empty polls", running: 3},
		{name: "after a lost poll", lostFirst: true},
		{name: "after a lost poll and empty polls", running: 2, lostFirst: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			if tt.lostFirst {
				shortenPolls(t, 20*time.Millisecond, 80*time.Millisecond)
			}
			waitMs := uint32(pollWait.Milliseconds())
			var calls atomic.Int32
			var bad atomic.Value
			c := startClient(t, &fakeAgent{waitProcess: func(ctx context.Context, req *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
				call := int(calls.Add(1) - 1)
				if req.Id != testID || req.ExecId != testExecID || req.WaitMs != waitMs {
					bad.Store(fmt.Sprintf("unexpected request %v", req))
				}
				if tt.lostFirst {
					if call == 0 {
						<-ctx.Done()
						return nil, ctx.Err()
					}
					call--
				}
				if call < tt.running {
					return &api.WaitProcessResponse{}, nil
				}
				return &api.WaitProcessResponse{Exited: true, ExitStatus: 137, OomKilled: true, ExitedAtUnixNs: 42}, nil
			}})

			var (
				resp *api.WaitProcessResponse
				err  error
			)
			within(t, 3*time.Second, func() { resp, err = c.Wait(context.Background(), testID, testExecID) })
			if err != nil {
				t.Fatalf("Wait: %v", err)
			}
			if !resp.Exited || resp.ExitStatus != 137 || !resp.OomKilled || resp.ExitedAtUnixNs != 42 {
				t.Fatalf("Wait = %v, want the guest's exit", resp)
			}
			want := tt.running + 1
			if tt.lostFirst {
				want++
			}
			if got := int(calls.Load()); got != want {
				t.Fatalf("guest saw %d polls, want %d", got, want)
			}
			if msg := bad.Load(); msg != nil {
				t.Fatal(msg)
			}
		})
	}
}

// Verified two-sided: retrying a timed-out poll without checking the
// caller's ctx spins the first two cases until the watchdog.
func TestWaitReturnsWhenCallerGivesUpOrGuestFails(t *testing.T) {
	errGuest := errors.New("no such process")
	tests := []struct {
		name    string
		guest   func(ctx context.Context) (*api.WaitProcessResponse, error)
		wantIs  error
		wantMsg string
	}{
		{
			name:   "caller deadline while polls return at once",
			guest:  func(context.Context) (*api.WaitProcessResponse, error) { return &api.WaitProcessResponse{}, nil },
			wantIs: context.DeadlineExceeded,
		},
		{
			name: "caller deadline during a poll",
			guest: func(ctx context.Context) (*api.WaitProcessResponse, error) {
				<-ctx.Done()
				return nil, ctx.Err()
			},
			wantIs: context.DeadlineExceeded,
		},
		{
			name:    "guest error",
			guest:   func(context.Context) (*api.WaitProcessResponse, error) { return nil, errGuest },
			wantMsg: errGuest.Error(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			c := startClient(t, &fakeAgent{waitProcess: func(ctx context.Context, _ *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
				return tt.guest(ctx)
			}})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			var err error
			within(t, 3*time.Second, func() { _, err = c.Wait(ctx, testID, testExecID) })
			if err == nil {
				t.Fatal("Wait succeeded")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
		})
	}
}

// BenchmarkCopyOutput moves a 10 MiB stream through a real ttrpc server on a
// unix socket, in replies of the given size.
func BenchmarkCopyOutput(b *testing.B) {
	data, sum := testStream()
	for _, size := range []int{64 << 10, 256 << 10, ChunkSize} {
		b.Run(fmt.Sprintf("chunk=%dKiB", size>>10), func(b *testing.B) {
			c := startClient(b, &fakeAgent{readStdio: func(_ context.Context, req *api.ReadStdioRequest) (*api.ReadStdioResponse, error) {
				off := min(req.Offset, uint64(len(data)))
				end := min(off+uint64(min(size, int(req.Max))), uint64(len(data)))
				return &api.ReadStdioResponse{Data: data[off:end], Eof: end == uint64(len(data))}, nil
			}})
			w := newHashWriter(0, 0)
			b.SetBytes(streamSize)
			b.ReportAllocs()
			for b.Loop() {
				n, err := c.CopyOutput(context.Background(), testID, testExecID, api.StdioStream_STDOUT, io.Discard)
				if err != nil || n != streamSize {
					b.Fatalf("CopyOutput = %d, %v", n, err)
				}
			}
			// One checked copy outside the timing: the benchmark moves the right bytes.
			if _, err := c.CopyOutput(context.Background(), testID, testExecID, api.StdioStream_STDOUT, w); err != nil || w.sum() != sum {
				b.Fatalf("checked copy: %v, hash match %v", err, w.sum() == sum)
			}
		})
	}
}
