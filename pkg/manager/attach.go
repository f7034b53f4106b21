package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/logfile"
)

// boxStdio makes the stdio of a process named name in box directory dir:
// an empty framed log io/name.log ("box" logs to box.log) and, with stdin,
// a FIFO.
func boxStdio(dir, name string, stdin, terminal bool) (Stdio, error) {
	logPath := filepath.Join(dir, logFileName)
	if name != "box" {
		logPath = filepath.Join(dir, ioDirName, name+".log")
	}
	if err := os.MkdirAll(filepath.Join(dir, ioDirName), 0o700); err != nil {
		return Stdio{}, err
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return Stdio{}, fmt.Errorf("log file: %w", err)
	}
	f.Close()
	u := (&url.URL{Scheme: "file", Path: logPath, RawQuery: "format=framed"}).String()
	st := Stdio{Stdout: u, Stderr: u}
	if terminal {
		st.Stderr = ""
	}
	if stdin {
		st.Stdin = filepath.Join(dir, ioDirName, name+".stdin")
		if err := mkfifo(st.Stdin); err != nil {
			return Stdio{}, err
		}
	}
	return st, nil
}

// openStdinWriter opens the write end of a stdin FIFO without waiting for
// the shim to open the other (the open completes when it does, or fails
// when ctx ends first).
func openStdinWriter(ctx context.Context, path string) (io.WriteCloser, error) {
	w, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open stdin: %w", err)
	}
	return w, nil
}

// takeStdin hands over the held stdin writer of box id, once.
func (s *Service) takeStdin(id string) io.WriteCloser {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.stdins[id]
	delete(s.stdins, id)
	return w
}

// logPathOf is the framed log a Stdio names, or "".
func logPathOf(stdout string) string {
	u, err := url.Parse(stdout)
	if err != nil || u.Scheme != "file" || u.Query().Get("format") != "framed" {
		return ""
	}
	return u.Path
}

// mkfifo makes a FIFO at path, replacing any file there.
func mkfifo(path string) error {
	os.Remove(path)
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return &os.PathError{Op: "mkfifo", Path: path, Err: err}
	}
	return nil
}

// Logs writes the box's output; with Follow until its process exited.
func (s *Service) Logs(ctx context.Context, ref string, o api.LogsOptions, stdout, stderr io.Writer) error {
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	path := logPathOf(b.Record().Stdout)
	if path == "" {
		return errorf(errdefs.ErrFailedPrecondition, "box %s keeps no log (its output was not sent to one)", ref)
	}
	done := make(chan struct{})
	if o.Follow && b.Record().Status != StatusStopped {
		go func() {
			defer close(done)
			b.Wait(ctx, "")
		}()
	} else {
		close(done)
	}
	return readLog(ctx, path, o.Since, o.Follow, done, stdout, stderr)
}

// readLog copies a framed log's frames to stdout and stderr.
func readLog(ctx context.Context, path string, since time.Time, follow bool, done <-chan struct{}, stdout, stderr io.Writer) error {
	return logfile.Read(ctx, path, logfile.ReadOptions{Since: since, Follow: follow, Done: done}, func(f logfile.Frame) error {
		w := stdout
		if f.Stream == logfile.Stderr {
			w = stderr
		}
		if w == nil {
			return nil
		}
		_, err := w.Write(f.Data)
		return err
	})
}

// Attach relays the box's output from its start, its stdin, terminal sizes
// and signals until its process exits.
func (s *Service) Attach(ctx context.Context, ref string, stdio api.Stdio) (api.Exit, error) {
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Exit{}, err
	}
	defer b.Close()
	r := b.Record()
	path := logPathOf(r.Stdout)
	if path == "" {
		return api.Exit{}, errorf(errdefs.ErrFailedPrecondition, "box %s keeps no log to attach to", ref)
	}
	var stdin io.WriteCloser
	if stdio.Stdin != nil {
		stdin = s.takeStdin(r.ID)
	}
	return s.relay(ctx, b, "", path, stdin, stdio, func(ctx context.Context) (api.Exit, error) { return s.wait(ctx, b) })
}

// relay is Attach's and Exec's loop: output from the framed log at path,
// stdio.Stdin into stdin (closed when it ends; nil: none), sizes and
// signals to process execID, until wait returns.
func (s *Service) relay(ctx context.Context, b *Box, execID, path string, stdin io.WriteCloser, stdio api.Stdio, wait func(context.Context) (api.Exit, error)) (api.Exit, error) {
	wctx := context.WithoutCancel(ctx)
	done := make(chan struct{})
	var exit api.Exit
	var werr error
	go func() {
		defer close(done)
		exit, werr = wait(ctx)
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	if stdin != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if stdio.Stdin != nil {
				copyUntil(done, stdin, stdio.Stdin)
			}
			stdin.Close()
			b.CloseStdin(wctx, execID)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case sz, ok := <-stdio.Resize:
				if !ok {
					stdio.Resize = nil
					continue
				}
				b.ResizePty(wctx, execID, sz.Width, sz.Height)
			case sig, ok := <-stdio.Signals:
				if !ok {
					stdio.Signals = nil
					continue
				}
				if err := b.Kill(wctx, execID, sig, false); err != nil {
					log.G(ctx).WithError(err).Debug("forward signal")
				}
			case <-done:
				return
			}
		}
	}()
	rerr := readLog(ctx, path, time.Time{}, true, done, stdio.Stdout, stdio.Stderr)
	<-done
	if werr != nil {
		return api.Exit{}, werr
	}
	if rerr != nil && !errors.Is(rerr, context.Canceled) {
		return exit, fmt.Errorf("relaying output: %w", rerr)
	}
	return exit, nil
}

// copyUntil copies src to dst until src ends, a write fails or done closes.
func copyUntil(done <-chan struct{}, dst io.Writer, src io.Reader) {
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		io.Copy(dst, src)
	}()
	select {
	case <-ended:
	case <-done:
	}
}

// Exec runs another process in a running box and relays its stdio.
func (s *Service) Exec(ctx context.Context, ref string, req api.ExecRequest, stdio api.Stdio) (api.Exit, error) {
	if len(req.Cmd) == 0 {
		return api.Exit{}, errorf(errdefs.ErrInvalidArgument, "no command given")
	}
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Exit{}, err
	}
	defer b.Close()
	execID := "exec-" + NewID()
	st, err := boxStdio(b.Dir(), execID, req.Stdin, req.TTY)
	if err != nil {
		return api.Exit{}, err
	}
	defer removeStdio(st)
	var stdin io.WriteCloser
	if st.Stdin != "" {
		if stdin, err = openStdinWriter(ctx, st.Stdin); err != nil {
			return api.Exit{}, err
		}
		defer stdin.Close()
	}
	spec := ExecSpec{Args: req.Cmd, Env: req.Env, Cwd: req.Cwd, User: req.User, Terminal: req.TTY}
	if err := b.Exec(ctx, execID, spec, st); err != nil {
		return api.Exit{}, err
	}
	wctx := context.WithoutCancel(ctx)
	defer b.DeleteExec(wctx, execID)
	if _, err := b.Start(ctx, execID); err != nil {
		return api.Exit{}, err
	}
	return s.relay(ctx, b, execID, logPathOf(st.Stdout), stdin, stdio, func(ctx context.Context) (api.Exit, error) {
		e, err := b.Wait(wctx, execID)
		return api.Exit{Status: e.Status, At: e.At}, err
	})
}

// removeStdio removes an exec's log and FIFO.
func removeStdio(st Stdio) {
	if p := logPathOf(st.Stdout); p != "" {
		os.Remove(p)
	}
	if st.Stdin != "" {
		os.Remove(st.Stdin)
	}
}
