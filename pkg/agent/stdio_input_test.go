package agent

import (
	"bytes"
	"context"
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
