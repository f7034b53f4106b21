package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// clockBoxes is how many VMs boot at once in the clock test: on two cores,
// enough to starve every guest's timer calibration.
const clockBoxes = 10

// clockSleep is what each box sleeps, by its own clock.
const clockSleep = 60

// TestGuestClockKeepsTimeWithTenBootingAtOnce boots ten VMs at once on this
// two-core machine; each then times `sleep 60` by its own clock while the
// host times the same interval from the output's arrival. The guest's
// clock must not drift by 1% or more. Before the shim handed TCG guests the
// host's TSC frequency (pkg/vmm/tsc.go), guests booting together failed to
// calibrate their TSC against the starved PIT and fell back to jiffies: one
// box's `sleep 1000` ended after 14.5 minutes.
func TestGuestClockKeepsTimeWithTenBootingAtOnce(t *testing.T) {
	rootfs := busyboxRootfs(t)
	type result struct {
		guest, host time.Duration
		clock       string
		err         error
	}
	results := make([]result, clockBoxes)
	boxes := make([]*sandbox.Sandbox, clockBoxes)
	var wg sync.WaitGroup
	for i := range clockBoxes {
		cfg := sandboxConfig(t, rootfs, vmOpts{bootTimeout: 5 * time.Minute})
		id := "clock" + strconv.Itoa(i)
		spec, err := json.Marshal(newSpec(t, id, []string{"sh", "-c", fmt.Sprintf(clockScript, clockSleep)}))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb, err := sandbox.Start(context.Background(), cfg)
			if err != nil {
				results[i].err = fmt.Errorf("start: %w", err)
				return
			}
			boxes[i] = sb
			r := &results[i]
			r.guest, r.host, r.clock, r.err = timeSleep(sb, id, spec, clockSleep)
		}()
	}
	wg.Wait()
	for _, sb := range boxes {
		if sb == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := sb.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		cancel()
	}
	// Once all are stopped: the check counts every child of the test.
	for _, sb := range boxes {
		if sb != nil {
			assertNoLeaks(t, sb.Identity().Pid, rootfs)
		}
	}
	for i, r := range results {
		if r.err != nil {
			t.Errorf("box %d: %v", i, r.err)
			continue
		}
		drift := (r.guest.Seconds() - r.host.Seconds()) / r.host.Seconds()
		t.Logf("box %d: guest %.2fs, host %.2fs, drift %+.3f%%, clocksource %s", i, r.guest.Seconds(), r.host.Seconds(), 100*drift, r.clock)
		if math.Abs(drift) >= 0.01 {
			t.Errorf("box %d: guest clock drifted %+.2f%% (guest %.2fs for host %.2fs, clocksource %s)", i, 100*drift, r.guest.Seconds(), r.host.Seconds(), r.clock)
		}
	}
}

// clockScript prints the guest's clocksource, then sleeps %d seconds
// between two reads of its uptime.
const clockScript = "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; read a _ </proc/uptime; echo start $a; sleep %d; read b _ </proc/uptime; echo end $b"

// timeSleep runs spec (clockScript, sleeping secs) as container id in sb,
// and returns the interval by the guest's clock and by the host's (from
// the arrival of the two lines), and the guest's clocksource.
func timeSleep(sb *sandbox.Sandbox, id string, spec []byte, secs int) (guest, host time.Duration, clock string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+3*time.Minute)
	defer cancel()
	c := sb.Agent()
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{
		Id: id, Spec: spec, ShareTag: vmm.ShareTag, Rootfs: "rootfs",
		Stdio: &api.Stdio{Stdout: true, Stderr: true},
	}); err != nil {
		return 0, 0, "", fmt.Errorf("create: %w", err)
	}
	defer c.DeleteContainer(context.WithoutCancel(ctx), &api.DeleteContainerRequest{Id: id, Force: true})
	lines := &lineTimes{}
	copied := make(chan error, 1)
	go func() {
		_, err := c.CopyOutput(ctx, id, "", api.StdioStream_STDOUT, lines)
		copied <- err
	}()
	if _, err := c.StartContainer(ctx, &api.ContainerRequest{Id: id}); err != nil {
		return 0, 0, "", fmt.Errorf("start: %w", err)
	}
	exit, err := c.Wait(ctx, id, "")
	if err != nil {
		return 0, 0, "", fmt.Errorf("wait: %w", err)
	}
	if err := <-copied; err != nil {
		return 0, 0, "", fmt.Errorf("output: %w", err)
	}
	if exit.GetExitStatus() != 0 {
		return 0, 0, "", fmt.Errorf("exit %d, output %q", exit.GetExitStatus(), lines.text())
	}
	return lines.interval()
}

// lineTimes is a writer that notes when each output line arrives.
type lineTimes struct {
	mu      sync.Mutex
	partial string
	lines   []string
	at      []time.Time
}

func (l *lineTimes) Write(p []byte) (int, error) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial += string(p)
	for {
		i := strings.IndexByte(l.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		l.lines, l.at = append(l.lines, l.partial[:i]), append(l.at, now)
		l.partial = l.partial[i+1:]
	}
}

func (l *lineTimes) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n") + l.partial
}

// interval reads the clocksource line and the start and end lines.
func (l *lineTimes) interval() (guest, host time.Duration, clock string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) != 3 {
		return 0, 0, "", fmt.Errorf("want 3 lines of output, got %q", l.lines)
	}
	var a, b float64
	if _, err := fmt.Sscanf(l.lines[1], "start %g", &a); err != nil {
		return 0, 0, "", fmt.Errorf("line %q: %w", l.lines[1], err)
	}
	if _, err := fmt.Sscanf(l.lines[2], "end %g", &b); err != nil {
		return 0, 0, "", fmt.Errorf("line %q: %w", l.lines[2], err)
	}
	return time.Duration((b - a) * float64(time.Second)), l.at[2].Sub(l.at[1]), l.lines[0], nil
}
