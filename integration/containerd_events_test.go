package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/typeurl/v2"

	"github.com/boxlite/boxlite/pkg/health"
	healthapi "github.com/boxlite/boxlite/pkg/health/api"
)

// taskEvent is one /tasks/ event about a container.
type taskEvent struct {
	topic string
	// id is the process id the event is about: TaskExit's ID (the
	// container id for init, the exec id otherwise) or the exec id of
	// exec events; "" for events about the task as a whole.
	id     string
	status uint32
	pid    uint32
}

func (e taskEvent) String() string {
	s := e.topic
	if e.id != "" {
		s += "(" + e.id + ")"
	}
	if e.topic == "/tasks/exit" || e.topic == "/tasks/delete" {
		s += fmt.Sprintf("=%d", e.status)
	}
	return s
}

// eventLog records the task events of the daemon from the moment it is
// subscribed.
type eventLog struct {
	cancel context.CancelFunc
	done   chan struct{}

	// mu guards byContainer, health and err.
	mu sync.Mutex
	// byContainer lists each container's task events in arrival order.
	byContainer map[string][]taskEvent
	// health lists each container's health statuses in arrival order, apart
	// from the task events (a long test may see a default health check).
	health map[string][]string
	err    error
}

// subscribe starts recording events and returns once the subscription is
// live: a sentinel event published after subscribing has come back.
func (c *containerd) subscribe(t testing.TB) *eventLog {
	t.Helper()
	cl := c.goClient(t)
	ctx, cancel := context.WithCancel(nsCtx(context.Background()))
	ch, errs := cl.Subscribe(ctx, `namespace==`+testNamespace)
	l := &eventLog{cancel: cancel, done: make(chan struct{}), byContainer: map[string][]taskEvent{}, health: map[string][]string{}}
	synced := make(chan struct{})
	sentinel := fmt.Sprintf("sync-%d", time.Now().UnixNano())
	go func() {
		defer close(l.done)
		for {
			select {
			case env := <-ch:
				l.record(env, sentinel, synced)
			case err := <-errs:
				l.mu.Lock()
				if ctx.Err() == nil {
					l.err = err
				}
				l.mu.Unlock()
				return
			}
		}
	}()
	t.Cleanup(l.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := cl.EventService().Publish(nsCtx(context.Background()), "/boxlite-test/sync", &eventstypes.ContainerCreate{ID: sentinel}); err != nil {
			t.Fatalf("publish sentinel event: %v", err)
		}
		select {
		case <-synced:
			return l
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("event subscription not live within 10s")
		}
	}
}

// record files one envelope.
func (l *eventLog) record(env *events.Envelope, sentinel string, synced chan struct{}) {
	if env == nil || env.Event == nil {
		return
	}
	v, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		return
	}
	var cid string
	var e taskEvent
	e.topic = env.Topic
	switch ev := v.(type) {
	case *eventstypes.ContainerCreate:
		if ev.ID == sentinel {
			select {
			case <-synced:
			default:
				close(synced)
			}
		}
		return
	case *eventstypes.TaskCreate:
		cid, e.pid = ev.ContainerID, ev.Pid
	case *eventstypes.TaskStart:
		cid, e.pid = ev.ContainerID, ev.Pid
	case *eventstypes.TaskExit:
		cid, e.id, e.status, e.pid = ev.ContainerID, ev.ID, ev.ExitStatus, ev.Pid
		if e.id == cid {
			e.id = ""
		}
	case *eventstypes.TaskDelete:
		cid, e.id, e.status, e.pid = ev.ContainerID, ev.ID, ev.ExitStatus, ev.Pid
	case *eventstypes.TaskExecAdded:
		cid, e.id = ev.ContainerID, ev.ExecID
	case *eventstypes.TaskExecStarted:
		cid, e.id, e.pid = ev.ContainerID, ev.ExecID, ev.Pid
	case *eventstypes.TaskOOM:
		cid = ev.ContainerID
	case *eventstypes.TaskPaused:
		cid = ev.ContainerID
	case *eventstypes.TaskResumed:
		cid = ev.ContainerID
	case *healthapi.TaskHealth:
		if env.Topic == health.Topic {
			l.mu.Lock()
			l.health[ev.GetContainerId()] = append(l.health[ev.GetContainerId()], ev.GetStatus())
			l.mu.Unlock()
		}
		return
	default:
		return
	}
	l.mu.Lock()
	l.byContainer[cid] = append(l.byContainer[cid], e)
	l.mu.Unlock()
}

// of returns the events recorded so far for container id.
func (l *eventLog) of(id string) []taskEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]taskEvent(nil), l.byContainer[id]...)
}

// healthOf returns id's health statuses so far, space-separated.
func (l *eventLog) healthOf(id string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.health[id], " ")
}

// waitHealth waits until id's health statuses, space-separated, contain
// want, and reports whether they did within d.
func (l *eventLog) waitHealth(id, want string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if strings.Contains(l.healthOf(id), want) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFor waits until id's events, as a string, contain want, and reports
// whether they did within d.
func (l *eventLog) waitFor(id, want string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !strings.Contains(fmtEvents(l.of(id)), want) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

func (l *eventLog) stop() {
	l.cancel()
	<-l.done
}

func fmtEvents(evs []taskEvent) string {
	var s []string
	for _, e := range evs {
		s = append(s, e.String())
	}
	return strings.Join(s, " ")
}

// checkEvents fails a boxlite run whose events differ from want; for runc,
// the baseline, a difference is only logged: containerd-shim-runc-v2 2.4.2
// here sometimes loses the init's TaskExit when `ctr run --rm` deletes the
// task and the shim shuts down before its event forwarder has sent it (seen
// in about one run in four).
func checkEvents(t *testing.T, runtime, got, want string) {
	t.Helper()
	if got == want {
		return
	}
	if runtime == runcRuntime {
		t.Logf("runc baseline events differ (upstream): got %q, want %q", got, want)
		return
	}
	t.Errorf("events: got %q, want %q", got, want)
}

// TestContainerdEventsOfARunAreCompleteAndOrdered checks the task events of
// `ctr run --rm ... exit 3` under boxlite (and runc, logged): TaskCreate,
// TaskStart, TaskExit, TaskDelete, each once, in that order, with the exit
// status.
func TestContainerdEventsOfARunAreCompleteAndOrdered(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	want := "/tasks/create /tasks/start /tasks/exit=3 /tasks/delete=3"
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.newID(t, shortRuntime(rt))
			args := append(append([]string{"run", "--rm"}, c.runtimeFlags(rt)...), testImage, id, "sh", "-c", "exit 3")
			if r := c.ctr(t, args...); r.code != 3 {
				t.Fatalf("ctr run: exit %d, want 3 (stderr %q)", r.code, r.stderr)
			}
			if l.waitFor(id, "/tasks/delete", 20*time.Second) {
				time.Sleep(500 * time.Millisecond) // let duplicates, if any, arrive
			}
			evs := l.of(id)
			checkEvents(t, rt, fmtEvents(evs), want)
			if len(evs) == 4 && (evs[0].pid == 0 || evs[0].pid != evs[1].pid || evs[2].pid != evs[0].pid) {
				t.Errorf("pids differ between create, start and exit: %d %d %d", evs[0].pid, evs[1].pid, evs[2].pid)
			}
		})
	}
}

// TestContainerdEventsOfAnExecAreCompleteAndOrdered checks ExecAdded,
// ExecStarted and the exec's TaskExit, then the init's TaskExit and
// TaskDelete, under boxlite and runc. The exec writes to a log file, so the
// events do not depend on ctr's FIFO handling.
func TestContainerdEventsOfAnExecAreCompleteAndOrdered(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	want := "/tasks/create /tasks/start /tasks/exec-added(x1) /tasks/exec-started(x1) /tasks/exit(x1)=4 /tasks/exit=137 /tasks/delete=137"
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.runDetached(t, rt, []string{"--null-io"}, "sh", "-c", idleScript)
			r, ok := c.startCtr(t, nil, "task", "exec", "--log-uri", "file://"+filepath.Join(c.dir, id+".exec.log"),
				"--exec-id", "x1", id, "sh", "-c", "exit 4").waitFor(execTimeout)
			if !ok || r.code != 4 {
				t.Errorf("exec: finished %v exit %d stderr %q, want exit 4", ok, r.code, r.stderr)
			}
			c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
			c.waitStatus(t, id, "STOPPED")
			c.mustRun(t, "task", "delete", id)
			c.mustRun(t, "container", "rm", id)
			if l.waitFor(id, "/tasks/delete", 20*time.Second) {
				time.Sleep(500 * time.Millisecond)
			}
			checkEvents(t, rt, fmtEvents(l.of(id)), want)
		})
	}
}

// fastHealthFlags are ctr run's flags for a box without stdio whose health
// is probed every interval, timing out after a second, unhealthy after two
// failures from the start.
func fastHealthFlags(interval string) []string {
	return []string{"--null-io",
		"--annotation", health.AnnotationInterval + "=" + interval, "--annotation", health.AnnotationTimeout + "=1s",
		"--annotation", health.AnnotationStartPeriod + "=0s", "--annotation", health.AnnotationRetries + "=2"}
}

// TestContainerdReceivesHealthEvents: containerd accepts the shim's
// /tasks/health events and hands them to subscribers: a box tuned by
// annotations to probe every 200 ms becomes healthy; its VMM stopped with
// SIGSTOP stops answering and becomes unhealthy; continued, healthy again.
// Verified two-sided: without the shim's health checker no /tasks/health
// event arrives and the test fails.
func TestContainerdReceivesHealthEvents(t *testing.T) {
	c := startContainerd(t)
	l := c.subscribe(t)
	id := c.runDetached(t, boxliteRuntime, fastHealthFlags("200ms"), "sleep", "1000")
	vmm := c.taskPid(t, id)
	if !l.waitHealth(id, "healthy", time.Minute) {
		t.Fatalf("no healthy event: health events %q", l.healthOf(id))
	}
	if err := syscall.Kill(vmm, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	ok := l.waitHealth(id, "healthy unhealthy", time.Minute)
	syscall.Kill(vmm, syscall.SIGCONT)
	if !ok {
		t.Fatalf("no unhealthy event while the VMM was stopped: health events %q", l.healthOf(id))
	}
	if !l.waitHealth(id, "healthy unhealthy healthy", time.Minute) {
		t.Fatalf("no healthy event after the VMM continued: health events %q", l.healthOf(id))
	}
	c.mustRun(t, "task", "kill", "-s", "SIGKILL", id)
	c.waitStatus(t, id, "STOPPED")
	c.mustRun(t, "task", "delete", id)
	c.mustRun(t, "container", "rm", id)
}
