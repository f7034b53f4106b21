package vmm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// qmpMaxLine bounds one QMP message; a longer one is an error, not an
// allocation.
const qmpMaxLine = 1 << 20

// qmpClient is a minimal QEMU Machine Protocol client: one connection, one
// command at a time, events skipped.
type qmpClient struct {
	conn net.Conn
	r    *bufio.Reader
	// id numbers commands so replies can be matched.
	id int
}

// qmpMessage is any message QEMU sends: a greeting, a reply or an event.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *qmpError       `json:"error"`
	Event  string          `json:"event"`
	ID     *int            `json:"id"`
}

// qmpError is a QMP error reply.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *qmpError) Error() string { return e.Class + ": " + e.Desc }

// dialQMP connects to the QMP socket at path, reads the greeting and
// negotiates capabilities. ctx bounds the whole handshake.
func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	c := &qmpClient{conn: conn, r: bufio.NewReaderSize(conn, 4096)}
	if err := c.handshake(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func (c *qmpClient) handshake(ctx context.Context) error {
	stop := c.bound(ctx)
	defer stop()
	msg, err := c.read()
	if err != nil {
		return fmt.Errorf("qmp greeting: %w", c.ctxErr(ctx, err))
	}
	if msg.QMP == nil {
		return fmt.Errorf("qmp greeting: unexpected message")
	}
	if _, err := c.executeLocked(ctx, "qmp_capabilities", nil, nil); err != nil {
		return err
	}
	return nil
}

// Execute runs one command without arguments and returns its "return"
// value. ctx bounds the exchange.
func (c *qmpClient) Execute(ctx context.Context, cmd string) (json.RawMessage, error) {
	return c.ExecuteArgs(ctx, cmd, nil)
}

// ExecuteArgs runs one command with arguments (nil: none), as Execute.
func (c *qmpClient) ExecuteArgs(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	stop := c.bound(ctx)
	defer stop()
	return c.executeLocked(ctx, cmd, args, nil)
}

// SendFD hands f to QEMU under name (QMP getfd: the descriptor travels
// with the command as SCM_RIGHTS), for commands that take "fd:name".
func (c *qmpClient) SendFD(ctx context.Context, name string, f *os.File) error {
	stop := c.bound(ctx)
	defer stop()
	_, err := c.executeLocked(ctx, "getfd", map[string]string{"fdname": name}, f)
	return err
}

// executeLocked sends cmd, with f's descriptor as SCM_RIGHTS when f is not
// nil, and reads until its reply, skipping events. The connection's
// deadline must already be bound to ctx.
func (c *qmpClient) executeLocked(ctx context.Context, cmd string, args any, f *os.File) (json.RawMessage, error) {
	c.id++
	req, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        int    `json:"id"`
	}{cmd, args, c.id})
	if err != nil {
		return nil, err
	}
	req = append(req, '\n')
	if f == nil {
		_, err = c.conn.Write(req)
	} else if uc, ok := c.conn.(*net.UnixConn); ok {
		_, _, err = uc.WriteMsgUnix(req, syscall.UnixRights(int(f.Fd())), nil)
	} else {
		return nil, fmt.Errorf("qmp %s: a descriptor needs a unix socket", cmd)
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, c.ctxErr(ctx, err))
	}
	return c.readReply(ctx, cmd)
}

// readReply reads until the reply to the last command, skipping events.
func (c *qmpClient) readReply(ctx context.Context, cmd string) (json.RawMessage, error) {
	for {
		msg, err := c.read()
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, c.ctxErr(ctx, err))
		}
		switch {
		case msg.Event != "":
			continue
		case msg.ID == nil || *msg.ID != c.id:
			return nil, fmt.Errorf("qmp %s: reply to another command", cmd)
		case msg.Error != nil:
			return nil, fmt.Errorf("qmp %s: %w", cmd, msg.Error)
		case msg.Return == nil:
			return nil, fmt.Errorf("qmp %s: reply without return", cmd)
		}
		return msg.Return, nil
	}
}

// Quit asks QEMU to exit. QEMU may close the connection before or after
// replying; either way the request was delivered.
func (c *qmpClient) Quit(ctx context.Context) error {
	_, err := c.Execute(ctx, "quit")
	if err != nil && ctx.Err() == nil && isClosed(err) {
		return nil
	}
	return err
}

// isClosed reports errors meaning the peer went away.
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// read reads one message of at most qmpMaxLine bytes.
func (c *qmpClient) read() (qmpMessage, error) {
	var line []byte
	for {
		frag, err := c.r.ReadSlice('\n')
		if len(line)+len(frag) > qmpMaxLine {
			return qmpMessage{}, fmt.Errorf("message longer than %d bytes", qmpMaxLine)
		}
		line = append(line, frag...)
		if err == nil {
			break
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return qmpMessage{}, err
		}
	}
	var msg qmpMessage
	if err := json.Unmarshal(line, &msg); err != nil {
		return qmpMessage{}, fmt.Errorf("malformed message: %w", err)
	}
	return msg, nil
}

// bound makes ctx's deadline and cancellation interrupt blocked I/O on the
// connection. The returned func undoes it.
func (c *qmpClient) bound(ctx context.Context) func() {
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stop()
		_ = c.conn.SetDeadline(time.Time{})
	}
}

// ctxErr returns ctx's error when ctx ending is what interrupted I/O.
func (c *qmpClient) ctxErr(ctx context.Context, err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	// The connection's deadline is ctx's and may fire a moment before ctx
	// itself notices.
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

// Close closes the connection.
func (c *qmpClient) Close() error { return c.conn.Close() }
