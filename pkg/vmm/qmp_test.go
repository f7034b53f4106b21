package vmm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const qmpGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`

// fakeQMP serves one connection on a fresh unix socket with serve and
// returns the socket path.
func fakeQMP(t *testing.T, serve func(conn net.Conn, r *bufio.Reader)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), QMPSocketName)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		serve(conn, bufio.NewReader(conn))
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	return path
}

// reply reads one command and answers with result, echoing its id.
func reply(t *testing.T, conn net.Conn, r *bufio.Reader, wantCmd, result string) bool {
	t.Helper()
	line, err := r.ReadBytes('\n')
	if err != nil {
		return false
	}
	var req struct {
		Execute string `json:"execute"`
		ID      int    `json:"id"`
	}
	if err := json.Unmarshal(line, &req); err != nil || req.Execute != wantCmd {
		t.Errorf("fake qmp got %q, want %s", line, wantCmd)
		return false
	}
	res := strings.ReplaceAll(result, "ID", string(rune('0'+req.ID)))
	_, err = conn.Write([]byte(res + "\r\n"))
	return err == nil
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestQMPHandshakeAndQuit(t *testing.T) {
	path := fakeQMP(t, func(conn net.Conn, r *bufio.Reader) {
		conn.Write([]byte(qmpGreeting + "\r\n"))
		if !reply(t, conn, r, "qmp_capabilities", `{"return": {}, "id": ID}`) {
			return
		}
		reply(t, conn, r, "quit", `{"event": "SHUTDOWN", "data": {"guest": false}}`+"\r\n"+`{"return": {}, "id": ID}`)
	})
	ctx := testCtx(t, 10*time.Second)
	c, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Quit(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestQMPQuitAcceptsAClosedConnection(t *testing.T) {
	path := fakeQMP(t, func(conn net.Conn, r *bufio.Reader) {
		conn.Write([]byte(qmpGreeting + "\n"))
		if !reply(t, conn, r, "qmp_capabilities", `{"return": {}, "id": ID}`) {
			return
		}
		r.ReadBytes('\n') // quit: QEMU exits before replying
	})
	ctx := testCtx(t, 10*time.Second)
	c, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Quit(ctx); err != nil {
		t.Fatalf("Quit() = %v, want nil when QEMU closes the connection", err)
	}
}

func TestQMPErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(t *testing.T, conn net.Conn, r *bufio.Reader)
		want  string
		match func(error) bool
	}{
		{name: "error reply", want: "qmp qmp_capabilities: CommandNotFound: no such command",
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) {
				conn.Write([]byte(qmpGreeting + "\n"))
				reply(t, conn, r, "qmp_capabilities", `{"error": {"class": "CommandNotFound", "desc": "no such command"}, "id": ID}`)
			}},
		{name: "garbage greeting", want: "qmp greeting: malformed message",
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) { conn.Write([]byte("SSH-2.0-OpenSSH\n")) }},
		{name: "greeting that is not QMP", want: "qmp greeting: unexpected message",
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) { conn.Write([]byte(`{"return": {}}` + "\n")) }},
		{name: "oversized line", want: "longer than 1048576 bytes",
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) {
				conn.Write([]byte(`{"QMP": "` + strings.Repeat("a", qmpMaxLine)))
			}},
		{name: "closed before greeting", match: isClosed,
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) {}},
		{name: "reply to another command", want: "reply to another command",
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) {
				conn.Write([]byte(qmpGreeting + "\n"))
				reply(t, conn, r, "qmp_capabilities", `{"return": {}, "id": 99}`)
			}},
		{name: "no greeting times out", match: func(err error) bool { return errors.Is(err, context.DeadlineExceeded) },
			serve: func(t *testing.T, conn net.Conn, r *bufio.Reader) { r.ReadBytes('\n') }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeQMP(t, func(conn net.Conn, r *bufio.Reader) { tc.serve(t, conn, r) })
			ctx := testCtx(t, 200*time.Millisecond)
			c, err := dialQMP(ctx, path)
			if err == nil {
				c.Close()
				t.Fatal("dialQMP() succeeded")
			}
			if tc.want != "" && !strings.Contains(err.Error(), tc.want) {
				t.Errorf("dialQMP() error = %v, want %q", err, tc.want)
			}
			if tc.match != nil && !tc.match(err) {
				t.Errorf("dialQMP() error = %v (%T) is not the expected kind", err, errors.Unwrap(err))
			}
		})
	}
}

// TestQMPSendFDPassesTheDescriptor: getfd carries the file as SCM_RIGHTS
// in the same message as the command, and QEMU's answer completes it.
func TestQMPSendFDPassesTheDescriptor(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "state")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var want, got unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &want); err != nil {
		t.Fatal(err)
	}
	received := make(chan string, 1)
	path := fakeQMP(t, func(conn net.Conn, r *bufio.Reader) {
		conn.Write([]byte(qmpGreeting + "\r\n"))
		if !reply(t, conn, r, "qmp_capabilities", `{"return": {}, "id": ID}`) {
			return
		}
		buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4))
		n, oobn, _, _, err := conn.(*net.UnixConn).ReadMsgUnix(buf, oob)
		if err != nil {
			received <- err.Error()
			return
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		var fds []int
		if len(msgs) == 1 {
			fds, _ = unix.ParseUnixRights(&msgs[0])
		}
		if len(fds) != 1 || unix.Fstat(fds[0], &got) != nil {
			received <- fmt.Sprintf("no descriptor with %q", buf[:n])
			return
		}
		unix.Close(fds[0])
		received <- string(buf[:n])
		conn.Write([]byte(`{"return": {}, "id": 2}` + "\r\n"))
	})
	ctx := testCtx(t, 10*time.Second)
	c, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendFD(ctx, "template-state", f); err != nil {
		t.Fatal(err)
	}
	msg := <-received
	if !strings.Contains(msg, `"execute":"getfd"`) || !strings.Contains(msg, `"fdname":"template-state"`) {
		t.Errorf("QEMU got %s, want getfd of template-state", msg)
	}
	if got.Ino != want.Ino || got.Dev != want.Dev {
		t.Errorf("QEMU got inode %d, want the file's %d", got.Ino, want.Ino)
	}
}
