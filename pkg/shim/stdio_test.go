package shim

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/logfile"
)

// containerdStdout makes the stdout FIFO at path and opens its read side
// as containerd's client does (O_RDONLY|O_NONBLOCK, so the open returns at
// once and completes when the shim opens the write side). It is closed
// when the test ends.
func containerdStdout(t *testing.T, path string) io.ReadCloser {
	t.Helper()
	if err := unix.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	rd, err := fifo.OpenFifo(testCtx(t, testTimeout), path, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	return rd
}

// readWithin reads once from r, failing the test if nothing comes within
// testTimeout.
func readWithin(t *testing.T, r io.Reader) string {
	t.Helper()
	type result struct {
		s   string
		err error
	}
	got := make(chan result, 1)
	go func() {
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		got <- result{string(buf[:n]), err}
	}()
	select {
	case res := <-got:
		if res.err != nil {
			t.Fatalf("read: %v", res.err)
		}
		return res.s
	case <-time.After(testTimeout):
		t.Fatalf("nothing read within %v", testTimeout)
		return ""
	}
}

// With a terminal, containerd's client and nerdctl make only the stdout
// FIFO: the relay must not open (or need) the stderr one. Regression for
// nerdctl run -t, which failed with "open fifo ...-stderr: no such file or
// directory"; verified two-sided: with the terminal early return in
// openOutputs removed, the terminal case fails with exactly that error.
func TestRelayWithATerminalOpensNoStderrFIFO(t *testing.T) {
	for _, tc := range []struct {
		name     string
		terminal bool
		// wantErr is a substring of openRelay's error; "" means success.
		wantErr string
	}{
		{name: "terminal", terminal: true},
		{name: "no terminal needs the stderr FIFO", terminal: false, wantErr: "-stderr: no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			dir := t.TempDir()
			stdout, stderr := filepath.Join(dir, "box-stdout"), filepath.Join(dir, "box-stderr")
			rd := containerdStdout(t, stdout)
			cfg := stdioConfig{stdout: stdout, stderr: stderr, terminal: tc.terminal}
			r, err := openRelay(testCtx(t, testTimeout), cfg, "default", "box")
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), "open fifo "+stderr) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("openRelay() = %v; want an error opening %s", err, stderr)
				}
				return
			}
			if err != nil {
				t.Fatalf("openRelay() with a terminal and no stderr FIFO: %v", err)
			}
			defer r.close()
			if r.stderr != nil {
				t.Errorf("the relay holds a stderr writer with a terminal")
			}
			if cfg.agentStdio().Stderr {
				t.Errorf("the guest is asked for a stderr stream with a terminal")
			}
			if _, err := r.stdout.Write([]byte("tty output")); err != nil {
				t.Fatal(err)
			}
			if got := readWithin(t, rd); got != "tty output" {
				t.Errorf("containerd read %q from stdout", got)
			}
			if _, err := os.Lstat(stderr); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the relay made %s: %v", stderr, err)
			}
		})
	}
}

// writeLogger writes a binary:// logger script to dir and returns its
// path. Like nerdctl's logger it closes fd 5 to say it is ready; it never
// reads fd 3 or 4, so EOF there does not end it.
func writeLogger(t *testing.T, dir, name, body string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// assertGone fails the test if pid is still in /proc (alive or a zombie).
func assertGone(t *testing.T, pid int) {
	t.Helper()
	if data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status"); err == nil {
		t.Errorf("logger %d is still there:\n%s", pid, data)
	}
}

// shutWithin runs shut and fails the test if it has not returned within
// bound; it still waits (bounded) for it, so that nothing outlives the
// test.
func shutWithin(t *testing.T, what string, bound time.Duration, shut func()) {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() {
		shut()
		close(done)
	}()
	select {
	case <-done:
		return
	case <-time.After(bound):
	}
	select {
	case <-done:
		t.Errorf("%s took %v, want less than %v", what, time.Since(start).Round(time.Millisecond), bound)
	case <-time.After(loggerExitTimeout + testTimeout):
		t.Fatalf("%s did not return within %v", what, loggerExitTimeout+testTimeout)
	}
}

// A failed create aborts the relay: its binary:// logger, which has nothing
// to flush, is SIGKILLed and reaped at once, even one that ignores SIGTERM
// and EOF. Regression: the relay used to wait 10 s for the logger to exit
// by itself, which made every failed nerdctl run 10 s slower; verified
// two-sided: with shut's old wait-then-kill restored, abort takes 10 s and
// this test fails.
func TestAbortKillsABinaryLoggerAtOnce(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	logger := writeLogger(t, dir, "logger", "trap '' TERM\nexec 5>&-\nexec sleep 600\n")
	r, err := openRelay(testCtx(t, testTimeout), stdioConfig{stdout: "binary://" + logger}, "default", "box")
	if err != nil {
		t.Fatal(err)
	}
	pid := r.logger.Pid()
	shutWithin(t, "abort", 2*time.Second, r.abort)
	e, ok := r.logger.Exit()
	if !ok || e.Signal != syscall.SIGKILL {
		t.Errorf("logger exit = %v, %v; want killed by SIGKILL", e, ok)
	}
	assertGone(t, pid)
}

// Closing a relay sends its binary:// logger SIGTERM, as containerd's runc
// shim does, and reaps it as soon as it exits: nerdctl's logger waits for
// the task's exit otherwise, not for EOF. Regression: the relay used to
// wait 10 s for the logger and then SIGKILL it; verified two-sided: with
// shut's old wait-then-kill restored, close takes 10 s, the logger never
// sees SIGTERM and this test fails.
func TestCloseSendsABinaryLoggerSIGTERM(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	// The sleep does not hold the readiness pipe, and the trap kills it,
	// so the logger leaves no process behind.
	logger := writeLogger(t, dir, "logger", `trap 'kill "$pid"; echo TERM > "$0.term"; exit 0' TERM
sleep 600 5>&- &
pid=$!
exec 5>&-
wait "$pid"
`)
	r, err := openRelay(testCtx(t, testTimeout), stdioConfig{stdout: "binary://" + logger}, "default", "box")
	if err != nil {
		t.Fatal(err)
	}
	pid := r.logger.Pid()
	shutWithin(t, "close", 2*time.Second, r.close)
	if e, ok := r.logger.Exit(); !ok || e.Status != 0 || e.Signal != 0 {
		t.Errorf("logger exit = %v, %v; want status 0 from its SIGTERM trap", e, ok)
	}
	if data, err := os.ReadFile(logger + ".term"); err != nil || string(data) != "TERM\n" {
		t.Errorf("logger's SIGTERM trap did not run: %q, %v", data, err)
	}
	assertGone(t, pid)
}

// A relay whose open fails (here a logger that never says it is ready,
// past the request's deadline) kills its binary:// logger at once, as
// containerd's shim does: the process never ran, so there is nothing to
// flush. Regression: the failed open closed the relay like a finished
// one, giving the logger SIGTERM and 12 s; verified two-sided: with
// openRelay's cleanup calling close instead of abort, openRelay takes
// 12.5 s here and this test fails.
func TestFailedOpenKillsTheLoggerAtOnce(t *testing.T) {
	checkLeaks(t)
	logger := writeLogger(t, t.TempDir(), "logger", "trap '' TERM\necho $$ > \"$0.pid\"\nexec sleep 600\n")
	ctx := testCtx(t, 500*time.Millisecond)
	shutWithin(t, "openRelay", 2*time.Second, func() {
		r, err := openRelay(ctx, stdioConfig{stdout: "binary://" + logger}, "default", "box")
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("openRelay() = %v, %v; want the deadline's error", r, err)
		}
	})
	data, err := os.ReadFile(logger + ".pid")
	if err != nil {
		t.Fatalf("the logger did not run: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	assertGone(t, pid)
}

// fileURI returns the file:// URI of path with query, its path escaped (a
// test's temporary directory may hold a '#').
func fileURI(path, query string) string {
	return (&url.URL{Scheme: "file", Path: path, RawQuery: query}).String()
}

// A file:// URI with format=framed gives the two streams one framed log
// (pkg/logfile) in which each chunk keeps its stream, and the file is
// closed with the relay.
func TestFramedFileURIKeepsTheStreamsApart(t *testing.T) {
	checkLeaks(t)
	path := filepath.Join(t.TempDir(), "box.log")
	uri := fileURI(path, "format=framed")
	r, err := openRelay(testCtx(t, testTimeout), stdioConfig{stdout: uri, stderr: uri}, "default", "box")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		w    io.Writer
		data string
	}{{r.stdout, "out 1\n"}, {r.stderr, "err\n"}, {r.stdout, "out 2\n"}} {
		if _, err := w.w.Write([]byte(w.data)); err != nil {
			t.Fatal(err)
		}
	}
	r.close()
	var got []string
	err = logfile.Read(testCtx(t, testTimeout), path, logfile.ReadOptions{}, func(fr logfile.Frame) error {
		got = append(got, fr.Stream.String()+" "+string(fr.Data))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"stdout out 1\n", "stderr err\n", "stdout out 2\n"}; !slices.Equal(got, want) {
		t.Fatalf("log holds %q, want %q", got, want)
	}
}

// A file:// URI's format other than framed is refused, naming it, before
// anything is created.
func TestFileURIOfAnUnknownFormatIsRefused(t *testing.T) {
	for _, tc := range []struct{ name, format string }{
		{"json", "json"},
		{"raw", "raw"},
		{"empty", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			path := filepath.Join(t.TempDir(), "box.log")
			uri := fileURI(path, "format="+tc.format)
			r, err := openRelay(testCtx(t, testTimeout), stdioConfig{stdout: uri, stderr: uri}, "default", "box")
			if err == nil {
				r.close()
				t.Fatalf("openRelay(%s) succeeded", uri)
			}
			if want := "unsupported log format " + strconv.Quote(tc.format); !strings.Contains(err.Error(), want) {
				t.Fatalf("openRelay(%s) = %v; want it to say %s", uri, err, want)
			}
			if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the refused URI made %s: %v", path, err)
			}
		})
	}
}
