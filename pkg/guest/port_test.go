package guest

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakePort returns a listener whose port is one end of a socketpair, and the
// host's end. A connected socket never reports POLLHUP, like a port whose
// host is connected.
func fakePort(t *testing.T) (*portListener, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	l := newPortListener("fake")
	l.f = os.NewFile(uintptr(fds[0]), "guest")
	host := os.NewFile(uintptr(fds[1]), "host")
	t.Cleanup(func() {
		l.Close()
		host.Close()
	})
	return l, host
}

// frameOn encodes a ttrpc frame on a stream.
func frameOn(typ byte, stream uint32, payload string) []byte {
	f := frame(typ, payload)
	f[4], f[5], f[6], f[7] = byte(stream>>24), byte(stream>>16), byte(stream>>8), byte(stream)
	return f
}

// readSession reads a connection until it ends.
func readSession(t *testing.T, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testTimeout))
	var got bytes.Buffer
	buf := make([]byte, 3) // small reads exercise the held-back header
	for {
		n, err := c.Read(buf)
		got.Write(buf[:n])
		if errors.Is(err, io.EOF) {
			return got.Bytes()
		}
		if err != nil {
			t.Fatalf("read: %v (got %q so far)", err, got.Bytes())
		}
	}
}

func TestFastReconnectStartsANewConnection(t *testing.T) {
	checkLeaks(t)
	l, host := fakePort(t)
	old := append(frameOn(frameRequest, 1, "old-1"), frameOn(frameRequest, 3, "old-3")...)
	next := append(frameOn(frameRequest, 1, "new-1"), frameOn(frameRequest, 3, "new-3")...)
	// Both sessions arrive before the guest reads, split mid-header.
	all := append(append([]byte{}, old...), next...)
	cut := len(old) + 4
	host.Write(all[:cut])

	c1, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	go func() { host.Write(all[cut:]) }()
	if got := readSession(t, c1); !bytes.Equal(got, old) {
		t.Fatalf("first session read %q, want %q", got, old)
	}
	if _, err := c1.Write(frameOn(frameResponse, 3, "late reply")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ended session wrote (err %v): a late reply would reach the new session", err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	c1.Close()
	c2 := <-accepted
	if c2 == nil {
		t.Fatal("no second connection")
	}
	c2.SetReadDeadline(time.Now().Add(testTimeout))
	got := make([]byte, len(next))
	if _, err := io.ReadFull(c2, got); err != nil || !bytes.Equal(got, next) {
		t.Fatalf("second session read %q (%v), want %q", got, err, next)
	}
	if _, err := c2.Write(frameOn(frameResponse, 1, "ok")); err != nil {
		t.Fatalf("new session cannot write: %v", err)
	}
}

func TestHostDisconnectEndsTheConnection(t *testing.T) {
	l, host := fakePort(t)
	req := frameOn(frameRequest, 1, "ping")
	host.Write(req)
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	// The port reads EOF when the host goes away; a socket does on shutdown.
	unix.Shutdown(int(host.Fd()), unix.SHUT_WR)
	if got := readSession(t, c); !bytes.Equal(got, req) {
		t.Fatalf("read %q, want %q", got, req)
	}
}

func TestDrainWaitsForEveryReply(t *testing.T) {
	l, host := fakePort(t)
	host.Write(append(frameOn(frameRequest, 1, "a"), frameOn(frameRequest, 3, "b")...))
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c := conn.(*portConn)
	buf := make([]byte, 64)
	for c.requests < 2 {
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	drained := make(chan struct{})
	go func() {
		c.drain(t.Context())
		close(drained)
	}()
	go io.Copy(io.Discard, host)
	c.Write(frameOn(frameResponse, 1, "A"))
	c.mu.Lock()
	answered := c.responses
	c.mu.Unlock()
	if answered != 1 {
		t.Fatalf("counted %d responses, want 1", answered)
	}
	select {
	case <-drained:
		t.Fatal("drained with a reply missing")
	default:
	}
	resp := frameOn(frameResponse, 3, "B")
	c.Write(resp[:5])
	c.Write(resp[5:])
	select {
	case <-drained:
	case <-time.After(testTimeout):
		t.Fatal("drain did not return once every request was answered")
	}
}

func TestCloseUnblocksAcceptAndRead(t *testing.T) {
	checkLeaks(t)
	l, _ := fakePort(t)
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		readErr <- err
	}()
	acceptErr := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		acceptErr <- err
	}()
	l.Close()
	for _, ch := range []chan error{readErr, acceptErr} {
		select {
		case err := <-ch:
			if err == nil {
				t.Fatal("no error after close")
			}
		case <-time.After(testTimeout):
			t.Fatal("blocked after close")
		}
	}
}
