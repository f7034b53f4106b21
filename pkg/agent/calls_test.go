package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// shortenFrameTimeout sets frameTimeout for one test. Tests using it must
// not run in parallel.
func shortenFrameTimeout(t testing.TB, d time.Duration) {
	t.Helper()
	old := frameTimeout
	frameTimeout = d
	t.Cleanup(func() { frameTimeout = old })
}

// answerPings answers the two pings of Dial and returns the last ping's
// stream id.
func answerPings(t testing.TB, c net.Conn) (uint32, error) {
	var id uint32
	for range 2 {
		var err error
		if id, _, err = readFrame(c); err != nil {
			return 0, err
		}
		if _, err := c.Write(pingReply(t, id)); err != nil {
			return 0, err
		}
	}
	return id, nil
}

// A guest that answers calls never made, or a call twice (a flood of
// answers), once Dial succeeded: the client closes with ErrProtocol naming
// the rule, whatever the guest sends next.
//
// Verified two-sided: with newClient using newGuardConn (calls not
// followed) every case fails: ttrpc logs "received message on inactive
// stream" for each frame and the client stays open.
func TestAnswersToCallsNotWaitingCloseClient(t *testing.T) {
	tests := []struct {
		name string
		// after is what the guest sends once Dial returned; last is the
		// stream of the last (answered) ping.
		after func(t testing.TB, last uint32) []byte
		word  string
	}{
		{"answer to a call never made", func(t testing.TB, last uint32) []byte { return pingReply(t, last+1000) }, "never opened"},
		{"second answer to a call", func(t testing.TB, last uint32) []byte { return pingReply(t, last) }, "answered already"},
		{"flood of answers to a call", func(t testing.TB, last uint32) []byte {
			var b []byte
			for range 1000 {
				b = append(b, pingReply(t, last)...)
			}
			return b
		}, "answered already"},
		{"stream data on a call never made", func(t testing.TB, last uint32) []byte { return frame(last+2, frameTypeData, 0, []byte("x")) }, "never opened"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			dialed := make(chan struct{})
			path := rawGuest(t, func(c net.Conn) {
				last, err := answerPings(t, c)
				if err != nil {
					return
				}
				<-dialed
				_, _ = c.Write(tt.after(t, last))
				_, _ = io.Copy(io.Discard, c)
			})
			c := dial(t, path)
			close(dialed)
			waitClosed(t, c.Done(), 2*time.Second, "Done")
			requireProtocolError(t, c.Err())
			if !strings.Contains(c.Err().Error(), tt.word) {
				t.Fatalf("violation %q does not say %q", c.Err(), tt.word)
			}
			_, err := c.State(context.Background(), &api.ContainerRequest{Id: "c1"})
			requireProtocolError(t, err)
		})
	}
}

// An answer that comes after the host gave up on its call is the call's
// one answer, not a violation: the connection stays usable.
//
// This keeps the rule from being too strict. Verified two-sided: with
// maxWaitingCalls 1 (the given-up call forgotten when the next is sent)
// the late answer closes the client as a second answer.
func TestLateAnswerToAGivenUpCallIsAccepted(t *testing.T) {
	checkLeaks(t)
	late := make(chan struct{})
	path := rawGuest(t, func(c net.Conn) {
		if _, err := answerPings(t, c); err != nil {
			return
		}
		first, _, err := readFrame(c)
		if err != nil {
			return
		}
		<-late
		second, _, err := readFrame(c)
		if err != nil {
			return
		}
		// The given-up call's answer first, then the second call's.
		_, _ = c.Write(append(pingReply(t, first), pingReply(t, second)...))
		_, _ = io.Copy(io.Discard, c)
	})
	c := dial(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := c.Ping(ctx, &api.PingRequest{})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unanswered ping: %v, want DeadlineExceeded", err)
	}
	close(late)
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Ping(ctx, &api.PingRequest{}); err != nil {
		t.Fatalf("ping after a late answer: %v", err)
	}
	if c.Err() != nil {
		t.Fatalf("late answer taken for a violation: %v", c.Err())
	}
}

// A guest that begins a frame and stalls (inside the header or the
// payload) fails the call in flight and closes the client with ErrProtocol
// within frameTimeout, instead of blocking every call of the connection
// until its deadline, for ever. One that is only silent between frames, or
// sends a frame in pieces within frameTimeout, is fine.
//
// Verified two-sided: with frameBegun setting no deadline the stalled
// cases fail: the call ends with DeadlineExceeded at its 5 s deadline and
// the client stays open.
func TestStalledFrameClosesClient(t *testing.T) {
	const stall = 300 * time.Millisecond
	shortenFrameTimeout(t, stall)
	tests := []struct {
		name string
		// answer sends the answer to the call on stream id, in pieces.
		answer func(t testing.TB, c net.Conn, id uint32)
		// word is what the violation says; "": the call succeeds.
		word string
	}{
		{"header then part of the payload", func(t testing.TB, c net.Conn, id uint32) {
			r := pingReply(t, id)
			_, _ = c.Write(r[:len(r)-2])
		}, "frame stalled"},
		{"part of the header", func(t testing.TB, c net.Conn, id uint32) {
			_, _ = c.Write(pingReply(t, id)[:4])
		}, "frame header stalled"},
		{"silent longer than frameTimeout before the frame", func(t testing.TB, c net.Conn, id uint32) {
			time.Sleep(3 * stall)
			_, _ = c.Write(pingReply(t, id))
		}, ""},
		{"pieces within frameTimeout", func(t testing.TB, c net.Conn, id uint32) {
			r := pingReply(t, id)
			for _, piece := range [][]byte{r[:3], r[3:12], r[12:]} {
				_, _ = c.Write(piece)
				time.Sleep(stall / 10)
			}
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			path := rawGuest(t, func(c net.Conn) {
				if _, err := answerPings(t, c); err != nil {
					return
				}
				id, _, err := readFrame(c)
				if err != nil {
					return
				}
				tt.answer(t, c, id)
				_, _ = io.Copy(io.Discard, c)
			})
			c := dial(t, path)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := c.Ping(ctx, &api.PingRequest{})
			if tt.word == "" {
				if err != nil || c.Err() != nil {
					t.Fatalf("ping: %v (Err %v), want an answer", err, c.Err())
				}
				return
			}
			requireProtocolError(t, err)
			if !strings.Contains(err.Error(), tt.word) {
				t.Fatalf("violation %q does not say %q", err, tt.word)
			}
			waitClosed(t, c.Done(), 2*time.Second, "Done")
		})
	}
}

// A guest that stops reading (its port full) fails the write of the call
// in flight and closes the client with ErrProtocol within frameTimeout:
// ttrpc's write ignores the call's deadline and holds the lock every other
// call needs, so without the bound every call of the connection, Shutdown
// included, blocked for ever.
//
// Verified two-sided: without the write deadline in Write the call was
// still blocked 5 s after its 1 s deadline (the test fails at within).
func TestGuestThatStopsReadingClosesClient(t *testing.T) {
	checkLeaks(t)
	shortenFrameTimeout(t, 300*time.Millisecond)
	stop := make(chan struct{})
	path := rawGuest(t, func(c net.Conn) {
		if _, err := answerPings(t, c); err != nil {
			return
		}
		<-stop // reads nothing more
	})
	defer close(stop)
	c := dial(t, path)
	data := make([]byte, ChunkSize)
	var err error
	within(t, 5*time.Second, func() {
		// More than a unix socket buffers, in calls of at most ChunkSize.
		for i := 0; i < 16 && err == nil; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = c.WriteStdin(ctx, &api.WriteStdinRequest{Id: "c1", Data: data})
			cancel()
			if errors.Is(err, context.DeadlineExceeded) {
				err = nil // the write went out; the guest holds it
			}
		}
	})
	requireProtocolError(t, err)
	if !strings.Contains(err.Error(), "stopped reading") {
		t.Fatalf("violation %q does not say the guest stopped reading", err)
	}
	waitClosed(t, c.Done(), 2*time.Second, "Done")
}
