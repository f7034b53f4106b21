package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// testTimeout bounds every blocking step of a test: a deadlock fails the
// test instead of hanging it.
const testTimeout = 30 * time.Second

// filledStream returns a stream holding data, already at EOF.
func filledStream(t *testing.T, data string) *outStream {
	t.Helper()
	s := newOutStream(io.NopCloser(bytes.NewReader([]byte(data))), outBufferSize)
	t.Cleanup(func() { s.Close() })
	waitDone(t, s)
	return s
}

// waitDone waits for the stream's pump to return.
func waitDone(t *testing.T, s *outStream) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(testTimeout):
		t.Fatal("pump did not finish")
	}
}

func TestReadStdioOffsets(t *testing.T) {
	type read struct {
		offset  uint64
		max     int
		want    string
		eof     bool
		invalid bool
	}
	tests := []struct {
		name  string
		reads []read
	}{
		{"all at once ends with eof", []read{{0, 0, "hello world", true, false}}},
		{"retry at same offset returns same bytes", []read{
			{0, 5, "hello", false, false},
			{0, 5, "hello", false, false},
			{5, 3, " wo", false, false},
			{5, 3, " wo", false, false},
		}},
		{"eof only once every byte was returned", []read{
			{0, 10, "hello worl", false, false},
			{10, 10, "d", true, false},
			{11, 10, "", true, false},
		}},
		{"offset beyond produced bytes is rejected", []read{{12, 1, "", false, true}}},
		{"offset before acknowledged bytes is rejected", []read{
			{6, 5, "world", true, false},
			{5, 5, "", false, true},
			{6, 5, "world", true, false},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := filledStream(t, "hello world")
			for i, r := range tt.reads {
				data, eof, err := s.Read(context.Background(), r.offset, r.max, 0)
				if r.invalid {
					if !errdefs.IsInvalidArgument(err) {
						t.Fatalf("read %d at %d: err = %v, want invalid argument", i, r.offset, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("read %d at %d: %v", i, r.offset, err)
				}
				if string(data) != r.want || eof != r.eof {
					t.Fatalf("read %d at %d: got %q eof=%v, want %q eof=%v", i, r.offset, data, eof, r.want, r.eof)
				}
			}
		})
	}
}

func TestReadWaitsForDataUntilItArrives(t *testing.T) {
	checkLeaks(t)
	s, w := pipeStream(t)
	defer w.Close()
	defer s.Close()

	got := make(chan string, 1)
	go func() {
		data, _, err := s.Read(context.Background(), 0, 0, testTimeout)
		if err != nil {
			got <- "error: " + err.Error()
			return
		}
		got <- string(data)
	}()
	if _, err := w.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	select {
	case g := <-got:
		if g != "late" {
			t.Fatalf("got %q, want %q", g, "late")
		}
	case <-time.After(testTimeout):
		t.Fatal("read did not wake up on data")
	}
}

func TestReadReturnsEmptyWhenWaitExpires(t *testing.T) {
	checkLeaks(t)
	s, w := pipeStream(t)
	defer w.Close()
	defer s.Close()
	data, eof, err := s.Read(context.Background(), 0, 0, time.Millisecond)
	if err != nil || len(data) != 0 || eof {
		t.Fatalf("got %q eof=%v err=%v, want nothing", data, eof, err)
	}
}

func TestReadReturnsWhenCallerGivesUp(t *testing.T) {
	s, w := pipeStream(t)
	defer w.Close()
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	data, eof, err := s.Read(ctx, 0, 0, testTimeout)
	if err != nil || len(data) != 0 || eof {
		t.Fatalf("got %q eof=%v err=%v, want an empty answer", data, eof, err)
	}
}

func TestEOFIsReportedAfterWriterCloses(t *testing.T) {
	checkLeaks(t)
	s, w := pipeStream(t)
	defer s.Close()
	w.Write([]byte("bye"))
	w.Close()
	waitDone(t, s)
	data, eof, err := s.Read(context.Background(), 0, 2, 0)
	if err != nil || string(data) != "by" || eof {
		t.Fatalf("first read: %q eof=%v err=%v", data, eof, err)
	}
	data, eof, err = s.Read(context.Background(), 2, 2, 0)
	if err != nil || string(data) != "e" || !eof {
		t.Fatalf("second read: %q eof=%v err=%v", data, eof, err)
	}
}

// TestBackpressureKeepsEveryByteWithBoundedBuffer writes 10 MiB through a
// real pipe into a stream with a small buffer and reads it with a slow,
// irregular consumer: the buffer never exceeds its bound, the writer is held
// back instead of bytes being dropped, and every byte arrives in order.
func TestBackpressureKeepsEveryByteWithBoundedBuffer(t *testing.T) {
	checkLeaks(t)
	const total = 10 << 20
	const limit = 256 << 10
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s := newOutStream(r, limit)
	defer s.Close()

	src := make([]byte, total)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	want := sha256.Sum256(src)
	wrote := make(chan error, 1)
	go func() {
		_, err := w.Write(src)
		w.Close()
		wrote <- err
	}()

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	h := sha256.New()
	var off uint64
	for {
		if ctx.Err() != nil {
			t.Fatalf("deadlock: read %d of %d bytes", off, total)
		}
		s.mu.Lock()
		buffered := len(s.buf)
		s.mu.Unlock()
		if buffered > limit {
			t.Fatalf("buffer holds %d bytes, bound is %d", buffered, limit)
		}
		data, eof, err := s.Read(ctx, off, 1+rng.IntN(100<<10), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		h.Write(data)
		off += uint64(len(data))
		if eof {
			break
		}
	}
	if err := <-wrote; err != nil {
		t.Fatalf("writer: %v", err)
	}
	if off != total {
		t.Fatalf("read %d bytes, want %d", off, total)
	}
	if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Fatal("sha256 of the bytes read differs from the bytes written")
	}
}

func TestFullBufferBlocksTheWriter(t *testing.T) {
	const limit = 4 << 10
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	s := newOutStream(r, limit)
	defer s.Close()
	// The pipe holds 64 KiB and the stream 4 KiB: a writer of 1 MiB must
	// block until the host acknowledges.
	if err := w.SetWriteDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	n, err := w.Write(make([]byte, 1<<20))
	if err == nil || n >= 1<<20 {
		t.Fatalf("writer wrote %d bytes without blocking (err %v)", n, err)
	}
	s.mu.Lock()
	buffered := len(s.buf)
	s.mu.Unlock()
	if buffered > limit {
		t.Fatalf("buffer holds %d bytes, bound is %d", buffered, limit)
	}
}

func TestCloseStopsThePumpAndPendingReaders(t *testing.T) {
	checkLeaks(t)
	s, w := pipeStream(t)
	defer w.Close()
	got := make(chan bool, 1)
	go func() {
		_, eof, _ := s.Read(context.Background(), 0, 0, testTimeout)
		got <- eof
	}()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, s)
	select {
	case eof := <-got:
		if !eof {
			t.Fatal("reader of a closed stream did not see eof")
		}
	case <-time.After(testTimeout):
		t.Fatal("reader not woken by close")
	}
}

func TestStreamWithoutPipeIsEmptyAtEOF(t *testing.T) {
	s := newOutStream(nil, outBufferSize)
	data, eof, err := s.Read(context.Background(), 0, 0, testTimeout)
	if err != nil || len(data) != 0 || !eof {
		t.Fatalf("got %q eof=%v err=%v, want empty eof", data, eof, err)
	}
	if _, _, err := s.Read(context.Background(), 1, 0, 0); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("offset 1 of an empty stream: err = %v, want invalid argument", err)
	}
}

// pipeStream returns an output stream reading a new pipe, and the pipe's
// write end.
func pipeStream(t *testing.T) (*outStream, *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	return newOutStream(r, outBufferSize), w
}
