package health

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestMachine(t *testing.T) {
	fail := errors.New("ping: deadline exceeded")
	t0 := time.Unix(1000, 0)
	o := Options{StartPeriod: 10 * time.Second, Retries: 3}
	type step struct {
		at      time.Duration
		err     error
		want    Status
		streak  int
		changed bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"healthy at first success", []step{{1 * time.Second, nil, Healthy, 0, true}, {2 * time.Second, nil, Healthy, 0, false}}},
		{"failures in the start period do not count", []step{
			{1 * time.Second, fail, Starting, 0, false}, {5 * time.Second, fail, Starting, 0, false},
			{11 * time.Second, fail, Starting, 1, false}, {12 * time.Second, fail, Starting, 2, false},
			{13 * time.Second, fail, Unhealthy, 3, true}}},
		{"after a success, failures count even in the start period", []step{
			{1 * time.Second, nil, Healthy, 0, true}, {2 * time.Second, fail, Healthy, 1, false},
			{3 * time.Second, fail, Healthy, 2, false}, {4 * time.Second, fail, Unhealthy, 3, true}}},
		{"a success resets the streak", []step{
			{11 * time.Second, fail, Starting, 1, false}, {12 * time.Second, fail, Starting, 2, false},
			{13 * time.Second, nil, Healthy, 0, true}, {14 * time.Second, fail, Healthy, 1, false}}},
		{"recovers from unhealthy", []step{
			{11 * time.Second, fail, Starting, 1, false}, {12 * time.Second, fail, Starting, 2, false},
			{13 * time.Second, fail, Unhealthy, 3, true}, {14 * time.Second, fail, Unhealthy, 4, false},
			{15 * time.Second, nil, Healthy, 0, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := machine{opts: o, started: t0, state: State{Status: Starting}}
			for i, s := range tt.steps {
				changed := m.observe(s.err, t0.Add(s.at))
				if m.state.Status != s.want || m.state.FailingStreak != s.streak || changed != s.changed {
					t.Fatalf("step %d: %s streak %d changed %v; want %s %d %v", i, m.state.Status, m.state.FailingStreak, changed, s.want, s.streak, s.changed)
				}
				if (s.err == nil) != (m.state.LastError == "") {
					t.Fatalf("step %d: last error %q after err %v", i, m.state.LastError, s.err)
				}
			}
		})
	}
}

func TestOptionsSet(t *testing.T) {
	tests := []struct {
		key, value string
		want       Options
		bad        string
	}{
		{AnnotationDisabled, "true", Options{Disabled: true}, ""},
		{AnnotationDisabled, "false", Options{}, ""},
		{AnnotationDisabled, "yes please", Options{}, "want true or false"},
		{AnnotationInterval, "250ms", Options{Interval: 250 * time.Millisecond}, ""},
		{AnnotationInterval, "1ms", Options{}, "at least 10ms"},
		{AnnotationInterval, "often", Options{}, "duration"},
		{AnnotationTimeout, "2s", Options{Timeout: 2 * time.Second}, ""},
		{AnnotationStartPeriod, "0s", Options{}, ""},
		{AnnotationStartPeriod, "-1s", Options{}, "at least 0s"},
		{AnnotationRetries, "5", Options{Retries: 5}, ""},
		{AnnotationRetries, "0", Options{}, "1 to 1000"},
		{"io.boxlite.health.color", "red", Options{}, "unknown health setting"},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			var o Options
			err := o.Set(tt.key, tt.value, "annotation "+tt.key)
			if tt.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.bad) || !strings.Contains(err.Error(), tt.key) {
					t.Fatalf("err %v; want invalid argument naming %s and saying %q", err, tt.key, tt.bad)
				}
				return
			}
			if err != nil || o != tt.want {
				t.Fatalf("got %+v, %v; want %+v", o, err, tt.want)
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	o := DefaultOptions()
	if o.Disabled || o.Interval != 30*time.Second || o.Timeout != 10*time.Second || o.StartPeriod != 60*time.Second || o.Retries != 3 {
		t.Fatalf("defaults %+v", o)
	}
}

// scripted is a probe that returns its script's errors in turn (then nil)
// and can block until its ctx ends.
type scripted struct {
	mu     sync.Mutex
	script []error
	calls  int
	block  bool
}

func (s *scripted) probe(ctx context.Context) error {
	s.mu.Lock()
	s.calls++
	block := s.block
	var err error
	if len(s.script) > 0 {
		err, s.script = s.script[0], s.script[1:]
	}
	s.mu.Unlock()
	if block {
		<-ctx.Done()
		return ctx.Err()
	}
	return err
}

func TestCheckerReportsEachTransitionAndStops(t *testing.T) {
	fail := errors.New("no answer")
	p := &scripted{script: []error{nil, fail, fail, nil}}
	got := make(chan State, 10)
	o := Options{Interval: time.Millisecond, Timeout: time.Second, Retries: 2}
	c := NewChecker(o, time.Now(), p.probe, func(s State) { got <- s })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	var seq []string
	for len(seq) < 3 {
		select {
		case s := <-got:
			seq = append(seq, string(s.Status))
		case <-time.After(10 * time.Second):
			t.Fatalf("transitions %v; want healthy unhealthy healthy", seq)
		}
	}
	if strings.Join(seq, " ") != "healthy unhealthy healthy" {
		t.Fatalf("transitions %v", seq)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its ctx was cancelled")
	}
	if st := c.State(); st.Status != Healthy {
		t.Fatalf("final state %+v", st)
	}
}

// A probe that never answers is bounded by Timeout, counts as a failure,
// and a cancel during it stops Run without a report.
func TestCheckerBoundsAHangingProbe(t *testing.T) {
	p := &scripted{block: true}
	got := make(chan State, 10)
	o := Options{Interval: time.Millisecond, Timeout: 20 * time.Millisecond, Retries: 1}
	c := NewChecker(o, time.Now(), p.probe, func(s State) { got <- s })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)
	select {
	case s := <-got:
		if s.Status != Unhealthy || !strings.Contains(s.LastError, "deadline exceeded") {
			t.Fatalf("state %+v; want unhealthy after a timed-out probe", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a hanging probe was never timed out")
	}
}

func TestDisabledCheckerNeverProbes(t *testing.T) {
	p := &scripted{}
	c := NewChecker(Options{Disabled: true, Interval: time.Millisecond}, time.Now(), p.probe, func(State) { t.Error("notified") })
	done := make(chan struct{})
	go func() { c.Run(context.Background()); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a disabled checker's Run did not return")
	}
	if p.calls != 0 {
		t.Fatalf("%d probes", p.calls)
	}
}

func TestFileRoundTripAndBadFiles(t *testing.T) {
	dir := t.TempDir()
	want := State{Status: Unhealthy, FailingStreak: 3, LastError: "ping: deadline exceeded", At: time.Unix(1700000000, 0).UTC()}
	if err := WriteFile(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(dir)
	if err != nil || got != want {
		t.Fatalf("read back %+v, %v; want %+v", got, err, want)
	}
	for name, data := range map[string]string{
		"garbage":        "{not json",
		"unknown status": `{"status":"fine"}`,
		"too big":        `{"status":"healthy","last_error":"` + strings.Repeat("x", 70<<10) + `"}`,
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, File), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
			if st, err := ReadFile(dir); err == nil {
				t.Fatalf("read %+v from a bad file", st)
			}
		})
	}
	if _, err := ReadFile(t.TempDir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}
