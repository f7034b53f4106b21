package manager

import (
	"io"
	"net/url"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/pkg/cio"
)

// FIFOs relays one process's stdio through FIFOs in the box directory, the
// way containerd's client does: the manager opens its ends before the shim
// is asked to open the others.
type FIFOs struct {
	io    cio.IO
	stdio Stdio
	// stdinDone is closed when stdin reached EOF (or failed); never for a
	// process without stdin.
	stdinDone chan struct{}
}

// NewFIFOs creates FIFOs for process id (the box id or an exec id) in
// boxDir/io and relays them: stdin (if non-nil) into the process, its
// stdout and stderr into the writers. With a terminal there is no stderr.
func NewFIFOs(boxDir, id string, stdin io.Reader, stdout, stderr io.Writer, terminal bool) (*FIFOs, error) {
	done := make(chan struct{})
	if stdin != nil {
		stdin = &eofReader{r: stdin, done: done}
	}
	opts := []cio.Opt{cio.WithStreams(stdin, stdout, stderr), cio.WithFIFODir(filepath.Join(boxDir, ioDirName))}
	if terminal {
		opts = append(opts, cio.WithTerminal)
	}
	pio, err := cio.NewCreator(opts...)(id)
	if err != nil {
		return nil, err
	}
	cfg := pio.Config()
	f := &FIFOs{io: pio, stdio: Stdio{Stdin: cfg.Stdin, Stdout: cfg.Stdout, Stderr: cfg.Stderr}, stdinDone: done}
	if terminal {
		f.stdio.Stderr = ""
	}
	return f, nil
}

// Stdio is what to put in the shim request.
func (f *FIFOs) Stdio() Stdio { return f.stdio }

// StdinDone is closed when the relayed stdin ended: the caller then tells
// the shim (CloseIO), as containerd's clients do.
func (f *FIFOs) StdinDone() <-chan struct{} { return f.stdinDone }

// Wait waits until the process's output has been relayed in full (the shim
// closed its ends) or the timeout passes, and reports which.
func (f *FIFOs) Wait(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		f.io.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// Close stops relaying and removes the FIFOs.
func (f *FIFOs) Close() error {
	f.io.Cancel()
	return f.io.Close()
}

// LogStdio sends a detached process's stdout and stderr to the box's log
// file (a file:// URI the shim opens) and gives it no stdin.
func LogStdio(boxDir string) Stdio {
	u := (&url.URL{Scheme: "file", Path: filepath.Join(boxDir, logFileName)}).String()
	return Stdio{Stdout: u, Stderr: u}
}

// eofReader closes done when its reader returns an error (io.EOF included).
type eofReader struct {
	r    io.Reader
	done chan struct{}
	once sync.Once
}

func (e *eofReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil {
		e.once.Do(func() { close(e.done) })
	}
	return n, err
}
