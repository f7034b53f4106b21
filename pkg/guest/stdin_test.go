package guest

import (
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// stdinPipe returns a stdin stream and the process's end of its pipe.
func stdinPipe(t *testing.T) (*inStream, *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	s := newInStream(w, nil)
	t.Cleanup(s.discard)
	return s, r
}

func TestStdinRetrySkipsBytesAlreadyWritten(t *testing.T) {
	type write struct {
		offset  uint64
		data    string
		want    uint64
		invalid bool
	}
	tests := []struct {
		name   string
		writes []write
		stream string
	}{
		{"sequential writes", []write{{0, "hello", 5, false}, {5, " world", 11, false}}, "hello world"},
		{"exact retry is a no-op", []write{{0, "hello", 5, false}, {0, "hello", 5, false}}, "hello"},
		{"overlapping retry writes only the new bytes", []write{{0, "hel", 3, false}, {0, "hello", 5, false}, {2, "llo!", 6, false}}, "hello!"},
		{"gap is rejected", []write{{0, "ab", 2, false}, {3, "d", 2, true}, {2, "c", 3, false}}, "abc"},
		{"empty write answers the count", []write{{0, "ab", 2, false}, {2, "", 2, false}}, "ab"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, r := stdinPipe(t)
			for i, wr := range tt.writes {
				n, err := s.Write(context.Background(), wr.offset, []byte(wr.data))
				if wr.invalid {
					if !errdefs.IsInvalidArgument(err) {
						t.Fatalf("write %d: err = %v, want invalid argument", i, err)
					}
					continue
				}
				if err != nil || n != wr.want {
					t.Fatalf("write %d at %d: got %d, %v; want %d", i, wr.offset, n, err, wr.want)
				}
			}
			if err := s.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			if err != nil || string(got) != tt.stream {
				t.Fatalf("process read %q (%v), want %q", got, err, tt.stream)
			}
		})
	}
}

func TestStdinWriteGivesUpWhenCallerDoes(t *testing.T) {
	checkLeaks(t)
	s, r := stdinPipe(t)
	// Nobody reads: the pipe fills and the write blocks until ctx ends.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	data := make([]byte, 1<<20)
	n, err := s.Write(ctx, 0, data)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if n == 0 || n >= uint64(len(data)) {
		t.Fatalf("wrote %d bytes, want a partial write", n)
	}
	// A retry from 0 resumes where the pipe stopped once the process reads.
	done := make(chan int64, 1)
	go func() {
		k, _ := io.Copy(io.Discard, r)
		done <- k
	}()
	ctx2, cancel2 := context.WithTimeout(context.Background(), testTimeout)
	defer cancel2()
	n, err = s.Write(ctx2, 0, data)
	if err != nil || n != uint64(len(data)) {
		t.Fatalf("retry: got %d, %v; want %d", n, err, len(data))
	}
	if err := s.Close(ctx2); err != nil {
		t.Fatal(err)
	}
	if k := <-done; k != int64(len(data)) {
		t.Fatalf("process read %d bytes, want %d", k, len(data))
	}
}

func TestStdinWaitingWriterGivesUpOnContext(t *testing.T) {
	s, _ := stdinPipe(t)
	// Hold the semaphore as a slow writer would.
	if err := s.acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Write(ctx, 0, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want canceled", err)
	}
	s.release()
}

func TestStdinWriteAfterCloseFails(t *testing.T) {
	s, _ := stdinPipe(t)
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := s.Write(context.Background(), 0, []byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("err = %v, want failed precondition", err)
	}
}

func TestStdinWriteToExitedProcessFails(t *testing.T) {
	checkLeaks(t)
	s, r := stdinPipe(t)
	r.Close()
	if _, err := s.Write(context.Background(), 0, []byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("err = %v, want failed precondition (broken pipe)", err)
	}
}

func TestStdinRejectsOversizedWrite(t *testing.T) {
	s, _ := stdinPipe(t)
	if _, err := s.Write(context.Background(), 0, make([]byte, maxStdinWrite+1)); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("err = %v, want invalid argument", err)
	}
}
