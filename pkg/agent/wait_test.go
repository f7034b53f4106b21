package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// Verified two-sided: returning the first answer whether exited or not fails
// the cases with empty polls; not retrying a timed-out poll fails the
// lost-poll cases.
func TestWaitPollsUntilExited(t *testing.T) {
	tests := []struct {
		name string
		// running is how many polls answer "not exited yet".
		running int
		// lostFirst loses the first poll's answer (shortened polls).
		lostFirst bool
	}{
		{name: "exited at once"},
		{name: "after three empty polls", running: 3},
		{name: "after a lost poll", lostFirst: true},
		{name: "after a lost poll and empty polls", running: 2, lostFirst: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			if tt.lostFirst {
				shortenPolls(t, 20*time.Millisecond, 80*time.Millisecond)
			}
			waitMs := uint32(pollWait.Milliseconds())
			var calls atomic.Int32
			var bad atomic.Value
			c := startClient(t, &fakeAgent{waitProcess: func(ctx context.Context, req *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
				call := int(calls.Add(1) - 1)
				if req.Id != testID || req.ExecId != testExecID || req.WaitMs != waitMs {
					bad.Store(fmt.Sprintf("unexpected request %v", req))
				}
				if tt.lostFirst {
					if call == 0 {
						<-ctx.Done()
						return nil, ctx.Err()
					}
					call--
				}
				if call < tt.running {
					return &api.WaitProcessResponse{}, nil
				}
				return &api.WaitProcessResponse{Exited: true, ExitStatus: 137, OomKilled: true, ExitedAtUnixNs: 42}, nil
			}})

			var (
				resp *api.WaitProcessResponse
				err  error
			)
			within(t, 3*time.Second, func() { resp, err = c.Wait(context.Background(), testID, testExecID) })
			if err != nil {
				t.Fatalf("Wait: %v", err)
			}
			if !resp.Exited || resp.ExitStatus != 137 || !resp.OomKilled || resp.ExitedAtUnixNs != 42 {
				t.Fatalf("Wait = %v, want the guest's exit", resp)
			}
			want := tt.running + 1
			if tt.lostFirst {
				want++
			}
			if got := int(calls.Load()); got != want {
				t.Fatalf("guest saw %d polls, want %d", got, want)
			}
			if msg := bad.Load(); msg != nil {
				t.Fatal(msg)
			}
		})
	}
}

// Verified two-sided: retrying a timed-out poll without checking the
// caller's ctx spins the first two cases until the watchdog.
func TestWaitReturnsWhenCallerGivesUpOrGuestFails(t *testing.T) {
	errGuest := errors.New("no such process")
	tests := []struct {
		name    string
		guest   func(ctx context.Context) (*api.WaitProcessResponse, error)
		wantIs  error
		wantMsg string
	}{
		{
			name:   "caller deadline while polls return at once",
			guest:  func(context.Context) (*api.WaitProcessResponse, error) { return &api.WaitProcessResponse{}, nil },
			wantIs: context.DeadlineExceeded,
		},
		{
			name: "caller deadline during a poll",
			guest: func(ctx context.Context) (*api.WaitProcessResponse, error) {
				<-ctx.Done()
				return nil, ctx.Err()
			},
			wantIs: context.DeadlineExceeded,
		},
		{
			name:    "guest error",
			guest:   func(context.Context) (*api.WaitProcessResponse, error) { return nil, errGuest },
			wantMsg: errGuest.Error(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			c := startClient(t, &fakeAgent{waitProcess: func(ctx context.Context, _ *api.WaitProcessRequest) (*api.WaitProcessResponse, error) {
				return tt.guest(ctx)
			}})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			var err error
			within(t, 3*time.Second, func() { _, err = c.Wait(ctx, testID, testExecID) })
			if err == nil {
				t.Fatal("Wait succeeded")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tt.wantMsg)
			}
		})
	}
}
