package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// pipeIO is the stdio of a process started by the runtime: a pipe for each
// stream the host asked for, /dev/null for the others. It implements
// runc.IO and runc.StartCloser.
//
// go-runc's own NewPipeIO cannot be used as is: it keeps the read end of the
// stdin pipe open in the agent forever (so a write to the stdin of a dead
// process blocks instead of failing) and leaves unrequested streams unset,
// which makes go-runc capture the runtime's output into a buffer that the
// container's process then holds open.
type pipeIO struct {
	// stdin is the agent's (write) end of the stdin pipe, or nil.
	stdin *os.File
	// stdout and stderr are the agent's (read) ends, or nil.
	stdout, stderr *os.File
	// childIn, childOut and childErr are the process's ends: pipe ends or
	// devNull. They are closed once the runtime has started.
	childIn, childOut, childErr *os.File
	// devNull is /dev/null, opened when a stream was not asked for.
	devNull *os.File
}

var (
	_ runc.IO          = (*pipeIO)(nil)
	_ runc.StartCloser = (*pipeIO)(nil)
)

// newPipeIO creates the pipes asked for by stdio. The process's ends are
// owned by uid:gid, so the process can reopen them (/proc/self/fd/1).
func newPipeIO(stdio *api.Stdio, uid, gid int) (_ *pipeIO, retErr error) {
	p := &pipeIO{}
	defer func() {
		if retErr != nil {
			p.Close()
		}
	}()
	var err error
	if stdio.GetStdin() {
		if p.childIn, p.stdin, err = pipe(uid, gid, true); err != nil {
			return nil, fmt.Errorf("stdin pipe: %w", err)
		}
	}
	if stdio.GetStdout() {
		if p.stdout, p.childOut, err = pipe(uid, gid, false); err != nil {
			return nil, fmt.Errorf("stdout pipe: %w", err)
		}
	}
	if stdio.GetStderr() {
		if p.stderr, p.childErr, err = pipe(uid, gid, false); err != nil {
			return nil, fmt.Errorf("stderr pipe: %w", err)
		}
	}
	if p.childIn == nil || p.childOut == nil || p.childErr == nil {
		if p.devNull, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// pipe returns a new pipe whose child end (the read end for stdin, the write
// end otherwise) is owned by uid:gid.
func pipe(uid, gid int, childReads bool) (r, w *os.File, err error) {
	if r, w, err = os.Pipe(); err != nil {
		return nil, nil, err
	}
	child := w
	if childReads {
		child = r
	}
	if err := unix.Fchown(int(child.Fd()), uid, gid); err != nil {
		r.Close()
		w.Close()
		return nil, nil, os.NewSyscallError("fchown", err)
	}
	return r, w, nil
}

// Stdin returns the agent's end of the stdin pipe (nil without one).
func (p *pipeIO) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}

// Stdout returns the agent's end of the stdout pipe (nil without one).
func (p *pipeIO) Stdout() io.ReadCloser {
	if p.stdout == nil {
		return nil
	}
	return p.stdout
}

// Stderr returns the agent's end of the stderr pipe (nil without one).
func (p *pipeIO) Stderr() io.ReadCloser {
	if p.stderr == nil {
		return nil
	}
	return p.stderr
}

// Set gives the process's ends to the runtime command, which passes them on
// to the container's process.
func (p *pipeIO) Set(cmd *exec.Cmd) {
	cmd.Stdin = orFile(p.childIn, p.devNull)
	cmd.Stdout = orFile(p.childOut, p.devNull)
	cmd.Stderr = orFile(p.childErr, p.devNull)
}

func orFile(f, fallback *os.File) *os.File {
	if f != nil {
		return f
	}
	return fallback
}

// CloseAfterStart closes the process's ends in the agent once the runtime
// holds them, so the agent sees EOF when the process's side closes.
func (p *pipeIO) CloseAfterStart() error {
	var errs []error
	for _, f := range []**os.File{&p.childIn, &p.childOut, &p.childErr, &p.devNull} {
		if *f != nil {
			errs = append(errs, (*f).Close())
			*f = nil
		}
	}
	return errors.Join(errs...)
}

// Close closes every end still open in the agent.
func (p *pipeIO) Close() error {
	errs := []error{p.CloseAfterStart()}
	for _, f := range []**os.File{&p.stdin, &p.stdout, &p.stderr} {
		if *f != nil {
			errs = append(errs, (*f).Close())
			*f = nil
		}
	}
	return errors.Join(errs...)
}

// release hands the agent's ends over to the caller: Close no longer closes
// them.
func (p *pipeIO) release() (stdin, stdout, stderr *os.File) {
	stdin, stdout, stderr = p.stdin, p.stdout, p.stderr
	p.stdin, p.stdout, p.stderr = nil, nil, nil
	return stdin, stdout, stderr
}
