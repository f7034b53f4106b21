package agent

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
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
