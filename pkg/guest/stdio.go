package guest

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// ptyTimeout bounds the wait for the runtime to send a terminal's master.
const ptyTimeout = 10 * time.Second

// procStdio is the agent's side of a process's stdio.
type procStdio struct {
	// stdin is nil without a stdin pipe (or terminal input).
	stdin *inStream
	// stdout and stderr always exist; without a pipe they are empty.
	stdout, stderr *outStream
	// pty is the terminal's master, nil without a terminal.
	pty *os.File
}

// stdioSetup prepares the stdio of one process across its runtime command:
// pipes (or /dev/null) given to the runtime, or, for a terminal, a console
// socket on which the runtime sends the pty master.
type stdioSetup struct {
	// req is what the host asked for.
	req *api.Stdio
	// io is the runtime command's stdio: the process's pipes, or /dev/null.
	io *pipeIO
	// sock receives the pty master; nil without a terminal.
	sock *runc.Socket
}

// newStdioSetup creates the pipes or console socket asked for by req; the
// pipes are owned by uid:gid.
func newStdioSetup(req *api.Stdio, uid, gid int) (*stdioSetup, error) {
	s := &stdioSetup{req: req}
	pipes := req
	if req.GetTerminal() {
		// The process's stdio is the pty; the runtime's own is /dev/null.
		pipes = &api.Stdio{}
		sock, err := runc.NewTempConsoleSocket()
		if err != nil {
			return nil, fmt.Errorf("console socket: %w", err)
		}
		s.sock = sock
	}
	pio, err := newPipeIO(pipes, uid, gid)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.io = pio
	return s, nil
}

// createOpts returns the options of `runtime create`.
func (s *stdioSetup) createOpts(pidFile string) *runc.CreateOpts {
	o := &runc.CreateOpts{IO: s.io, PidFile: pidFile}
	if s.sock != nil {
		o.ConsoleSocket = s.sock
	}
	return o
}

// execOpts returns the options of `runtime exec --detach`.
func (s *stdioSetup) execOpts(pidFile string) *runc.ExecOpts {
	o := &runc.ExecOpts{IO: s.io, PidFile: pidFile, Detach: true}
	if s.sock != nil {
		o.ConsoleSocket = s.sock
	}
	return o
}

// finish returns the agent's side once the runtime has started the process:
// the pipes' ends, or the pty master received from the runtime. The setup
// then owns nothing; Close is still safe.
func (s *stdioSetup) finish() (procStdio, error) {
	if s.sock == nil {
		in, out, errOut := s.io.release()
		ps := procStdio{
			stdout: newOutStream(fileOrNil(out), outBufferSize),
			stderr: newOutStream(fileOrNil(errOut), outBufferSize),
		}
		if in != nil {
			ps.stdin = newInStream(in, nil)
		}
		return ps, nil
	}
	pty, err := receivePty(s.sock)
	if err != nil {
		return procStdio{}, err
	}
	ps := procStdio{
		stdout: newOutStream(pty, outBufferSize),
		stderr: newOutStream(nil, outBufferSize),
		pty:    pty,
	}
	if s.req.GetStdin() {
		// Closing a terminal's input hangs it up: send end-of-file instead.
		ps.stdin = newInStream(pty, func(w *os.File) error {
			_, err := w.Write([]byte{4}) // VEOF (^D)
			return err
		})
	}
	return ps, nil
}

// Close releases whatever the setup still owns.
func (s *stdioSetup) Close() {
	if s.io != nil {
		s.io.Close()
	}
	if s.sock != nil {
		s.sock.Close()
	}
}

// fileOrNil avoids a typed nil inside an interface.
func fileOrNil(f *os.File) io.ReadCloser {
	if f == nil {
		return nil
	}
	return f
}

// receivePty receives the pty master the runtime sent on sock, as a
// non-blocking file the netpoller serves (so closing it stops a reader).
func receivePty(sock *runc.Socket) (*os.File, error) {
	type master interface {
		Fd() uintptr
		Close() error
	}
	type result struct {
		m   master
		err error
	}
	ch := make(chan result, 1)
	go func() {
		m, err := sock.ReceiveMaster()
		ch <- result{m, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-time.After(ptyTimeout):
		sock.Close()
		r = <-ch
		if r.err == nil {
			r.m.Close()
		}
		return nil, fmt.Errorf("runtime sent no terminal within %v: %w", ptyTimeout, errdefs.ErrUnavailable)
	}
	if r.err != nil {
		return nil, fmt.Errorf("receive terminal: %w", r.err)
	}
	defer r.m.Close()
	fd, err := unix.FcntlInt(r.m.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("dup pty", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("pty nonblock", err)
	}
	return os.NewFile(uintptr(fd), "pty"), nil
}

// resizePty sets the window size of a terminal.
func resizePty(pty *os.File, width, height uint32) error {
	if width > 0xffff || height > 0xffff {
		return fmt.Errorf("window %dx%d too large: %w", width, height, errdefs.ErrInvalidArgument)
	}
	rc, err := pty.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		ws := &unix.Winsize{Col: uint16(width), Row: uint16(height)}
		ioErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws)
	}); err != nil {
		return err
	}
	if ioErr != nil {
		return os.NewSyscallError("TIOCSWINSZ", ioErr)
	}
	return nil
}

// ResizePty resizes the terminal of the init (execID empty) or an exec.
func (a *Agent) ResizePty(ctx context.Context, req *api.ResizePtyRequest) error {
	_, p, err := a.process(req.GetId(), req.GetExecId())
	if err != nil {
		return err
	}
	if p.pty == nil {
		return fmt.Errorf("process %s has no terminal: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	return resizePty(p.pty, req.GetWidth(), req.GetHeight())
}
