package logfile

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/internal/poll"
)

// testTimeout bounds every wait of these tests.
const testTimeout = 10 * time.Second

// checkLeaks fails the test if, when it ends, it left more goroutines or
// open descriptors than when this was called. Call it first.
func checkLeaks(t *testing.T) {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
}

// testCtx returns a context that ends with the test or after testTimeout.
func testCtx(t *testing.T) (context.Context, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx, cancel
}

// createLog creates an empty log in a temporary directory and returns its
// path and the file opened for appending, as the shim opens it; the file
// is closed when the test ends.
func createLog(t *testing.T) (string, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "box.log")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return path, f
}

// encode returns frames as a log holds them.
func encode(frames ...Frame) []byte {
	var b []byte
	for _, fr := range frames {
		b = appendHeader(b, fr.Stream, fr.Time, len(fr.Data))
		b = append(b, fr.Data...)
	}
	return b
}

// write writes p to w, failing the test unless all of it was written.
func write(t *testing.T, w io.Writer, p string) {
	t.Helper()
	if n, err := w.Write([]byte(p)); err != nil || n != len(p) {
		t.Fatalf("Write(%d bytes) = %d, %v", len(p), n, err)
	}
}

// readAll reads the log at path without following it.
func readAll(t *testing.T, path string, o ReadOptions) ([]Frame, error) {
	t.Helper()
	ctx, _ := testCtx(t)
	var got []Frame
	err := Read(ctx, path, o, func(fr Frame) error {
		got = append(got, fr)
		return nil
	})
	return got, err
}

// chunk is a frame's stream and data, what a test compares.
type chunk struct {
	stream Stream
	data   string
}

// String shows c as stream:"data".
func (c chunk) String() string { return c.stream.String() + ":" + strconv.Quote(c.data) }

// chunks returns the streams and data of frames.
func chunks(frames []Frame) []chunk {
	var out []chunk
	for _, fr := range frames {
		out = append(out, chunk{fr.Stream, string(fr.Data)})
	}
	return out
}

// follower is a following Read running in its own goroutine.
type follower struct {
	// frames receives each frame Read passes on.
	frames chan Frame
	// result receives Read's return.
	result chan error
}

// follow starts a following Read of path; o.Follow is set. Read ends
// when ctx does, at the latest.
func follow(ctx context.Context, path string, o ReadOptions) *follower {
	o.Follow = true
	fl := &follower{frames: make(chan Frame), result: make(chan error, 1)}
	go func() {
		fl.result <- Read(ctx, path, o, func(fr Frame) error {
			select {
			case fl.frames <- fr:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	return fl
}

// next returns the next frame the follower reads, failing the test if
// none comes within testTimeout.
func (fl *follower) next(t *testing.T) chunk {
	t.Helper()
	select {
	case fr := <-fl.frames:
		return chunk{fr.Stream, string(fr.Data)}
	case err := <-fl.result:
		t.Fatalf("Read returned %v; want another frame", err)
	case <-time.After(testTimeout):
		t.Fatalf("no frame within %v", testTimeout)
	}
	return chunk{}
}

// end returns what the follower's Read returned, failing the test if it
// has not returned within bound.
func (fl *follower) end(t *testing.T, bound time.Duration) error {
	t.Helper()
	select {
	case err := <-fl.result:
		return err
	case fr := <-fl.frames:
		t.Fatalf("read %s %q; want Read to return", fr.Stream, fr.Data)
	case <-time.After(bound):
		t.Fatalf("Read has not returned within %v", bound)
	}
	return nil
}

// waitUntilBlocked returns once a following Read is blocked waiting for
// the log to change: a goroutine in the netpoller's IO wait inside
// (*watcher).wait.
func waitUntilBlocked(t *testing.T) {
	t.Helper()
	poll.Until(t, "a reader blocked on inotify", func() error {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "logfile.(*watcher).wait(") {
				return nil
			}
		}
		return errors.New("no goroutine in (*watcher).wait")
	})
}

func TestWritersRoundTripInterleavedStreams(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	stdout, stderr := NewWriters(f)
	before := time.Now()
	want := []chunk{{Stdout, "out 1\n"}, {Stderr, "err 1\n"}, {Stdout, "out 2\n"}, {Stdout, "out 3"}, {Stderr, "err 2\n"}}
	for _, c := range want {
		w := stdout
		if c.stream == Stderr {
			w = stderr
		}
		write(t, w, c.data)
	}
	write(t, stdout, "") // an empty write makes no frame
	after := time.Now()
	got, err := readAll(t, path, ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if gotChunks := chunks(got); !slices.Equal(gotChunks, want) {
		t.Fatalf("read %v, want %v", gotChunks, want)
	}
	for _, fr := range got {
		if fr.Time.Before(before) || fr.Time.After(after) {
			t.Errorf("frame stamped %v, outside the writes' %v..%v", fr.Time, before, after)
		}
	}
}

func TestConcurrentWritesKeepFramesWhole(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	stdout, stderr := NewWriters(f)
	const writes = 200
	var wg sync.WaitGroup
	for _, w := range []struct {
		w    io.Writer
		line string
	}{{stdout, "o"}, {stderr, "e"}} {
		wg.Go(func() {
			for range writes {
				// Errors show as missing frames below.
				w.w.Write([]byte(strings.Repeat(w.line, 100)))
			}
		})
	}
	wg.Wait()
	got, err := readAll(t, path, ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	count := map[Stream]int{}
	for _, fr := range got {
		want := map[Stream]string{Stdout: "o", Stderr: "e"}[fr.Stream]
		if string(fr.Data) != strings.Repeat(want, 100) {
			t.Fatalf("%s frame %q is not one whole write", fr.Stream, fr.Data)
		}
		count[fr.Stream]++
	}
	if count[Stdout] != writes || count[Stderr] != writes {
		t.Fatalf("read %v frames, want %d of each stream", count, writes)
	}
}

func TestALargeWriteIsSplitIntoFrames(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	_, stderr := NewWriters(f)
	data := bytes.Repeat([]byte("0123456789abcdef"), (2*MaxFrame+MaxFrame/2)/16)
	if n, err := stderr.Write(data); err != nil || n != len(data) {
		t.Fatalf("Write(%d bytes) = %d, %v", len(data), n, err)
	}
	got, err := readAll(t, path, ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("read %d frames, want 3", len(got))
	}
	var joined []byte
	for _, fr := range got {
		if fr.Stream != Stderr || len(fr.Data) > MaxFrame {
			t.Errorf("frame of %s with %d bytes; want stderr, at most %d", fr.Stream, len(fr.Data), MaxFrame)
		}
		joined = append(joined, fr.Data...)
	}
	if !bytes.Equal(joined, data) {
		t.Fatal("the frames' data is not the write's")
	}
}

func TestSinceSkipsOlderFrames(t *testing.T) {
	checkLeaks(t)
	path := filepath.Join(t.TempDir(), "box.log")
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	log := encode(
		Frame{Stdout, base, []byte("a")},
		Frame{Stderr, base.Add(time.Second), []byte("b")},
		Frame{Stdout, base.Add(2 * time.Second), []byte("c")},
	)
	if err := os.WriteFile(path, log, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		since time.Time
		want  []chunk
	}{
		{"zero reads all", time.Time{}, []chunk{{Stdout, "a"}, {Stderr, "b"}, {Stdout, "c"}}},
		{"a frame's own time keeps it", base.Add(time.Second), []chunk{{Stderr, "b"}, {Stdout, "c"}}},
		{"between frames", base.Add(1500 * time.Millisecond), []chunk{{Stdout, "c"}}},
		{"after every frame", base.Add(time.Hour), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readAll(t, path, ReadOptions{Since: tc.since})
			if err != nil {
				t.Fatal(err)
			}
			if c := chunks(got); !slices.Equal(c, tc.want) {
				t.Fatalf("read %v, want %v", c, tc.want)
			}
			for _, fr := range got {
				if fr.Time.Before(tc.since) {
					t.Errorf("frame stamped %v is before %v", fr.Time, tc.since)
				}
			}
		})
	}
}

func TestFollowSeesFramesWrittenWhileItWaits(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	stdout, stderr := NewWriters(f)
	write(t, stdout, "before")
	ctx, _ := testCtx(t)
	done := make(chan struct{})
	fl := follow(ctx, path, ReadOptions{Done: done})
	if got := fl.next(t); got != (chunk{Stdout, "before"}) {
		t.Fatalf("read %v first", got)
	}
	waitUntilBlocked(t)
	write(t, stderr, "while waiting")
	if got := fl.next(t); got != (chunk{Stderr, "while waiting"}) {
		t.Fatalf("read %v after a write", got)
	}
	// The writer finishes: Read reads what it wrote last, then returns.
	waitUntilBlocked(t)
	write(t, stdout, "last")
	close(done)
	if got := fl.next(t); got != (chunk{Stdout, "last"}) {
		t.Fatalf("read %v after the last write", got)
	}
	if err := fl.end(t, testTimeout); err != nil {
		t.Fatalf("Read() = %v once done; want nil", err)
	}
}

func TestFollowWithDoneClosedReadsToTheEnd(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	stdout, stderr := NewWriters(f)
	write(t, stdout, "out")
	write(t, stderr, "err")
	done := make(chan struct{})
	close(done)
	got, err := readAll(t, path, ReadOptions{Follow: true, Done: done})
	if err != nil {
		t.Fatal(err)
	}
	if want := []chunk{{Stdout, "out"}, {Stderr, "err"}}; !slices.Equal(chunks(got), want) {
		t.Fatalf("read %v, want %v", chunks(got), want)
	}
}

func TestFollowWaitsForTheRestOfAPartialFrame(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	frame := encode(Frame{Stderr, time.Now(), []byte("split across writes")})
	if _, err := f.Write(frame[:headerSize+5]); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := testCtx(t)
	fl := follow(ctx, path, ReadOptions{})
	waitUntilBlocked(t)
	if _, err := f.Write(frame[headerSize+5:]); err != nil {
		t.Fatal(err)
	}
	if got := fl.next(t); got != (chunk{Stderr, "split across writes"}) {
		t.Fatalf("read %v", got)
	}
	cancel()
	if err := fl.end(t, testTimeout); !errors.Is(err, context.Canceled) {
		t.Fatalf("Read() = %v, want context.Canceled", err)
	}
}

func TestCancelEndsAFollowPromptly(t *testing.T) {
	checkLeaks(t)
	path, _ := createLog(t)
	ctx, cancel := testCtx(t)
	fl := follow(ctx, path, ReadOptions{Done: make(chan struct{})})
	waitUntilBlocked(t)
	cancel()
	if err := fl.end(t, 2*time.Second); !errors.Is(err, context.Canceled) {
		t.Fatalf("Read() = %v, want context.Canceled", err)
	}
}

func TestCorruptFramesNameTheirOffset(t *testing.T) {
	good := encode(Frame{Stdout, time.Now(), []byte("hello")}) // 18 bytes
	long := appendHeader(nil, Stdout, time.Now(), maxReadFrame+1)
	badStream := appendHeader(nil, Stdout, time.Now(), 3)
	badStream[0] = 7
	for _, tc := range []struct {
		name string
		log  []byte
		want string
	}{
		{"length above 1 MiB", append(append([]byte{}, good...), long...), "frame length 1048577 above 1048576 at offset 18"},
		{"unknown stream byte", append(append([]byte{}, good...), append(badStream, "abc"...)...), "unknown stream byte 0x07 at offset 18"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			path := filepath.Join(t.TempDir(), "box.log")
			if err := os.WriteFile(path, tc.log, 0o600); err != nil {
				t.Fatal(err)
			}
			for _, follow := range []bool{false, true} {
				got, err := readAll(t, path, ReadOptions{Follow: follow})
				if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Read(Follow: %v) = %v; want %v naming %q", follow, err, ErrCorrupt, tc.want)
				}
				if want := []chunk{{Stdout, "hello"}}; !slices.Equal(chunks(got), want) {
					t.Errorf("read %v before the corrupt frame, want %v", chunks(got), want)
				}
			}
		})
	}
}

func TestAPartialTrailingFrameIsIgnoredWithoutFollow(t *testing.T) {
	full := encode(Frame{Stdout, time.Now(), []byte("whole")})
	next := encode(Frame{Stderr, time.Now(), []byte("in part")})
	for _, tc := range []struct {
		name string
		cut  int
	}{
		{"part of the header", 5},
		{"the header and part of the data", headerSize + 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			path := filepath.Join(t.TempDir(), "box.log")
			if err := os.WriteFile(path, append(append([]byte{}, full...), next[:tc.cut]...), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readAll(t, path, ReadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if want := []chunk{{Stdout, "whole"}}; !slices.Equal(chunks(got), want) {
				t.Fatalf("read %v, want %v", chunks(got), want)
			}
		})
	}
}

func TestAMissingLogIsNotExist(t *testing.T) {
	checkLeaks(t)
	path := filepath.Join(t.TempDir(), "no.log")
	for _, follow := range []bool{false, true} {
		if _, err := readAll(t, path, ReadOptions{Follow: follow}); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Read(Follow: %v) = %v; want fs.ErrNotExist", follow, err)
		}
	}
}

func TestAnErrorOfFnStopsRead(t *testing.T) {
	checkLeaks(t)
	path, f := createLog(t)
	stdout, _ := NewWriters(f)
	write(t, stdout, "one")
	write(t, stdout, "two")
	stop := errors.New("stop")
	calls := 0
	ctx, _ := testCtx(t)
	err := Read(ctx, path, ReadOptions{Follow: true}, func(Frame) error {
		calls++
		return stop
	})
	if err != stop || calls != 1 {
		t.Fatalf("Read() = %v after %d calls; want fn's error after 1", err, calls)
	}
}

// tearingWriter writes only part of what it is given, once, and fails.
type tearingWriter struct{ calls int }

func (w *tearingWriter) Write(p []byte) (int, error) {
	w.calls++
	return len(p) / 2, errors.New("no space left on device")
}

func TestAPartlyWrittenFrameStopsBothWriters(t *testing.T) {
	tw := &tearingWriter{}
	stdout, stderr := NewWriters(tw)
	if n, err := stdout.Write([]byte("data")); err == nil || n != 0 {
		t.Fatalf("Write() = %d, %v; want 0 and the write's error", n, err)
	}
	if _, err := stderr.Write([]byte("more")); err == nil || !strings.Contains(err.Error(), "partial frame") {
		t.Fatalf("Write() after a torn frame = %v; want an error", err)
	}
	if tw.calls != 1 {
		t.Fatalf("the log was written %d times; want no write after the torn frame", tw.calls)
	}
}

func BenchmarkWrite1KiBFrames(b *testing.B) {
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "box.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	stdout, _ := NewWriters(f)
	data := bytes.Repeat([]byte("x"), 1<<10)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := stdout.Write(data); err != nil {
			b.Fatal(err)
		}
	}
}
