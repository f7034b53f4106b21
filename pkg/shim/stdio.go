package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/logfile"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// stdioConfig is the stdio containerd asked for: FIFO paths, or URIs
// (file://, binary://) for stdout and stderr.
type stdioConfig struct {
	stdin, stdout, stderr string
	terminal              bool
}

// agentStdio says which streams the guest must pipe.
func (s stdioConfig) agentStdio() *api.Stdio {
	return &api.Stdio{Stdin: s.stdin != "", Stdout: s.stdout != "", Stderr: s.stderr != "" && !s.terminal, Terminal: s.terminal}
}

// Bounds of the relay.
const (
	// drainTimeout bounds the wait for output to reach EOF after the
	// process exited (a daemon left in the box may hold stdout open).
	drainTimeout = 5 * time.Second
	// loggerReadyTimeout bounds a binary:// logger's start.
	loggerReadyTimeout = 10 * time.Second
	// loggerExitTimeout bounds a binary:// logger's exit after SIGTERM
	// (containerd's runc shim waits 12 s too).
	loggerExitTimeout = 12 * time.Second
)

// relay moves one process's stdio between containerd's ends and the guest.
type relay struct {
	cfg    stdioConfig
	stdout io.WriteCloser
	stderr io.WriteCloser
	stdin  io.ReadCloser
	logger *reaper.Process

	cancel context.CancelFunc
	// outDone is closed when every output stream reached EOF or failed.
	outDone chan struct{}
	// inDone is closed when the stdin copy ended.
	inDone    chan struct{}
	closeOnce sync.Once
	outOnce   sync.Once
}

// openRelay opens containerd's ends of the process's stdio. FIFOs block until
// containerd has opened its side, bounded by ctx.
func openRelay(ctx context.Context, cfg stdioConfig, ns, id string) (_ *relay, retErr error) {
	r := &relay{cfg: cfg, outDone: make(chan struct{}), inDone: make(chan struct{})}
	defer func() {
		if retErr != nil {
			// Nothing ran: a binary:// logger has nothing to flush
			// and is killed at once, as containerd's shim does.
			r.abort()
		}
	}()
	if err := r.openOutputs(ctx, ns, id); err != nil {
		return nil, err
	}
	if cfg.stdin != "" {
		f, err := fifo.OpenFifo(ctx, cfg.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", cfg.stdin, err)
		}
		r.stdin = f
	}
	return r, nil
}

func (r *relay) openOutputs(ctx context.Context, ns, id string) error {
	u, err := url.Parse(r.cfg.stdout)
	if r.cfg.stdout == "" || err != nil || u.Scheme == "" || u.Scheme == "fifo" {
		if r.stdout, err = openFifoWriter(ctx, r.cfg.stdout); err != nil {
			return err
		}
		if r.cfg.terminal {
			// A terminal has one output: containerd's client (and
			// nerdctl) make no stderr FIFO then, and runc's shim
			// never opens it.
			return nil
		}
		r.stderr, err = openFifoWriter(ctx, r.cfg.stderr)
		return err
	}
	switch u.Scheme {
	case "file":
		return r.openLogFile(u)
	case "binary":
		return r.startLogger(ctx, u, ns, id)
	}
	return fmt.Errorf("unsupported stdio URI scheme %q in %s", u.Scheme, r.cfg.stdout)
}

// framedFormat is the file:// URI query (format=framed) that asks for a
// framed log (pkg/logfile) instead of raw output.
const framedFormat = "framed"

// openLogFile opens a file:// URI's path (its query is not part of it) for
// appending; the one file takes both streams. Raw by default, as with
// containerd's runc shim; with format=framed in the query, stdout and
// stderr are written as timestamped frames (pkg/logfile), so that readers
// can tell them apart. Any other format is refused.
func (r *relay) openLogFile(u *url.URL) error {
	q := u.Query()
	if q.Has("format") && q.Get("format") != framedFormat {
		return fmt.Errorf("unsupported log format %q in %s", q.Get("format"), r.cfg.stdout)
	}
	f, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log file %s: %w", u.Path, err)
	}
	if !q.Has("format") {
		r.stdout, r.stderr = f, nopCloser{f}
		return nil
	}
	stdout, stderr := logfile.NewWriters(f)
	// The file is closed once, with stdout.
	r.stdout, r.stderr = writeCloser{stdout, f}, nopCloser{stderr}
	return nil
}

// openFifoWriter opens a FIFO for writing; an empty path is discarded output.
func openFifoWriter(ctx context.Context, path string) (io.WriteCloser, error) {
	if path == "" {
		return nil, nil
	}
	f, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open fifo %s: %w", path, err)
	}
	return f, nil
}

// startLogger runs a binary:// logger the way containerd does: stdout and
// stderr pipes as fds 3 and 4, a readiness pipe as fd 5 that the logger
// closes when ready, CONTAINER_ID and CONTAINER_NAMESPACE in its env, and
// the URI's query as arguments.
func (r *relay) startLogger(ctx context.Context, u *url.URL, ns, id string) error {
	var args []string
	for k, vs := range u.Query() {
		args = append(args, k)
		if len(vs) > 0 && vs[0] != "" {
			args = append(args, vs[0])
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return err
	}
	cmd := exec.Command(u.Path, args...)
	cmd.Env = append(os.Environ(), "CONTAINER_ID="+id, "CONTAINER_NAMESPACE="+ns)
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	p, err := reaper.Default().Start(cmd)
	outR.Close()
	errR.Close()
	readyW.Close()
	r.stdout, r.stderr = outW, errW
	if err != nil {
		readyR.Close()
		return fmt.Errorf("start logger %s: %w", u.Path, err)
	}
	r.logger = p
	// The logger closes its end of the readiness pipe when it is ready.
	ready := make(chan error, 1)
	go func() {
		_, err := readyR.Read(make([]byte, 1))
		readyR.Close()
		ready <- err
	}()
	t := time.NewTimer(loggerReadyTimeout)
	defer t.Stop()
	select {
	case <-ready:
		return nil
	case <-p.Done():
		return fmt.Errorf("logger %s exited before it was ready", u.Path)
	case <-t.C:
		return fmt.Errorf("logger %s not ready within %v", u.Path, loggerReadyTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// start copies the guest's output to containerd's ends and containerd's
// stdin to the guest until EOF or close.
func (r *relay) start(c *agent.Client, id, execID string) {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	var wg sync.WaitGroup
	copyOut := func(stream api.StdioStream, w io.Writer) {
		defer wg.Done()
		if w == nil {
			w = io.Discard
		}
		if _, err := c.CopyOutput(ctx, id, execID, stream, w); err != nil && ctx.Err() == nil {
			log.L.WithError(err).WithField("id", id).WithField("exec_id", execID).Warnf("relay %s", stream)
		}
	}
	wg.Add(1)
	go copyOut(api.StdioStream_STDOUT, r.stdout)
	if !r.cfg.terminal {
		wg.Add(1)
		go copyOut(api.StdioStream_STDERR, r.stderr)
	}
	go func() {
		wg.Wait()
		close(r.outDone)
	}()
	if r.stdin == nil {
		close(r.inDone)
		return
	}
	go func() {
		defer close(r.inDone)
		if _, err := c.CopyInput(ctx, id, execID, r.stdin); err != nil && ctx.Err() == nil && !errors.Is(err, os.ErrClosed) {
			log.L.WithError(err).WithField("id", id).WithField("exec_id", execID).Debug("relay stdin")
		}
	}()
}

// closeStdin ends the stdin copy: containerd closed its side (CloseIO). The
// copy normally reaches EOF on its own; a FIFO still held by another writer
// is closed after a moment, and the guest's stdin closed.
func (r *relay) closeStdin(c *agent.Client, id, execID string) {
	if r.stdin == nil {
		return
	}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-r.inDone:
		return
	case <-t.C:
	}
	r.stdin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c.CloseStdin(ctx, &api.CloseStdinRequest{Id: id, ExecId: execID})
}

// drain waits, bounded, until the output streams reached EOF.
func (r *relay) drain() {
	t := time.NewTimer(drainTimeout)
	defer t.Stop()
	select {
	case <-r.outDone:
	case <-t.C:
		log.L.Warn("output still open after the process exited: closing it")
	}
}

// closeOutputs stops the output copies and closes containerd's output ends
// (a binary:// logger gets EOF). Stdin stays until close.
func (r *relay) closeOutputs() {
	r.outOnce.Do(func() {
		if r.cancel != nil {
			r.cancel()
		}
		for _, c := range []io.Closer{r.stdout, r.stderr} {
			if c != nil {
				c.Close()
			}
		}
	})
}

// close stops the copies and closes containerd's ends. A binary:// logger
// gets EOF and SIGTERM, as containerd's runc shim does (nerdctl's logger
// otherwise waits for the task's exit), and is reaped, SIGKILLed if it has
// not exited within loggerExitTimeout.
func (r *relay) close() { r.shut(loggerExitTimeout) }

// abort is close for a process that never ran (a failed create): the
// logger has nothing to flush and is SIGKILLed and reaped at once.
func (r *relay) abort() { r.shut(0) }

func (r *relay) shut(grace time.Duration) {
	r.closeOnce.Do(func() {
		if r.cancel != nil {
			r.cancel()
		}
		r.closeOutputs()
		if r.stdin != nil {
			r.stdin.Close()
		}
		if r.logger == nil {
			return
		}
		if grace > 0 {
			r.logger.Signal(syscall.SIGTERM)
			ctx, cancel := context.WithTimeout(context.Background(), grace)
			_, err := r.logger.Wait(ctx)
			cancel()
			if err == nil {
				return
			}
			log.L.WithField("pid", r.logger.Pid()).Warn("logger still running after SIGTERM: killing it")
		}
		r.logger.Signal(syscall.SIGKILL)
		r.logger.Wait(context.Background())
	})
}

// nopCloser keeps a shared writer open when one of its users closes.
type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// writeCloser writes through one writer and closes another: a framed
// stream writes through its framing and closes the file under it.
type writeCloser struct {
	io.Writer
	io.Closer
}
