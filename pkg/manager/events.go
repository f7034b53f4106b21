package manager

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	healthapi "github.com/boxlite/boxlite/pkg/health/api"
)

// Names of the events socket and the lock that says who owns it.
const (
	eventsSocketName = "events.sock"
	eventsLockName   = "events.lock"
)

// ErrEventsBusy says another manager process already serves the events
// socket of this state directory.
var ErrEventsBusy = errors.New("another boxlite process is already serving events")

// Event is one event a shim published, decoded.
type Event struct {
	// Time is when the shim published it (host clock).
	Time time.Time
	// ExitedAt is when the process exited, as the shim reports it (for a
	// TaskExit; the guest's clock may differ from the host's).
	ExitedAt time.Time
	// Namespace is the containerd namespace (boxlite).
	Namespace string
	// Topic is containerd's topic, like /tasks/exit.
	Topic string
	// ID is the box (container) id; ExecID the exec process id, if any.
	ID, ExecID string
	// Exited says the event is an exit (TaskExit); ExitStatus is its status.
	Exited     bool
	ExitStatus uint32
	// Pid is the process id the event names, if any.
	Pid uint32
	// Health is the new health of a /tasks/health event.
	Health string
	// Payload is the decoded event, or nil for a type the manager does not
	// know.
	Payload proto.Message
}

// String formats the event as boxlite events prints it:
// TIME TOPIC ID [exec_id] [exit status] [health].
func (e Event) String() string {
	parts := []string{e.Time.UTC().Format(time.RFC3339Nano), e.Topic, orDash(e.ID)}
	if e.ExecID != "" {
		parts = append(parts, e.ExecID)
	}
	if e.Exited {
		parts = append(parts, strconv.FormatUint(uint64(e.ExitStatus), 10))
	}
	if e.Health != "" {
		parts = append(parts, e.Health)
	}
	return strings.Join(parts, " ")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// DecodeEnvelope decodes one forwarded envelope. Unknown event types are
// returned with their topic and no payload.
func DecodeEnvelope(env *types.Envelope) (Event, error) {
	if env == nil {
		return Event{}, errorf(errdefs.ErrInvalidArgument, "empty envelope")
	}
	ev := Event{Time: env.GetTimestamp().AsTime(), Namespace: env.GetNamespace(), Topic: env.GetTopic()}
	if env.GetTimestamp() == nil {
		ev.Time = time.Now()
	}
	if env.GetEvent() == nil {
		return ev, nil
	}
	msg, err := anypb.UnmarshalNew(env.GetEvent(), proto.UnmarshalOptions{})
	if err != nil {
		return ev, fmt.Errorf("event %s of type %q: %w", ev.Topic, env.GetEvent().GetTypeUrl(), err)
	}
	ev.Payload = msg
	switch m := msg.(type) {
	case *eventtypes.TaskCreate:
		ev.ID, ev.Pid = m.GetContainerID(), m.GetPid()
	case *eventtypes.TaskStart:
		ev.ID, ev.Pid = m.GetContainerID(), m.GetPid()
	case *eventtypes.TaskExit:
		ev.ID, ev.Pid, ev.Exited, ev.ExitStatus = m.GetContainerID(), m.GetPid(), true, m.GetExitStatus()
		if m.GetID() != m.GetContainerID() {
			ev.ExecID = m.GetID()
		}
		ev.ExitedAt = ev.Time
		if t := m.GetExitedAt(); t != nil {
			ev.ExitedAt = t.AsTime()
		}
	case *eventtypes.TaskOOM:
		ev.ID = m.GetContainerID()
	case *eventtypes.TaskDelete:
		ev.ID, ev.Pid = m.GetContainerID(), m.GetPid()
		if m.GetID() != "" && m.GetID() != m.GetContainerID() {
			ev.ExecID = m.GetID()
		}
	case *eventtypes.TaskExecAdded:
		ev.ID, ev.ExecID = m.GetContainerID(), m.GetExecID()
	case *eventtypes.TaskExecStarted:
		ev.ID, ev.ExecID, ev.Pid = m.GetContainerID(), m.GetExecID(), m.GetPid()
	case *eventtypes.TaskPaused:
		ev.ID = m.GetContainerID()
	case *eventtypes.TaskResumed:
		ev.ID = m.GetContainerID()
	case *healthapi.TaskHealth:
		ev.ID, ev.Health = m.GetContainerId(), m.GetStatus()
	}
	return ev, nil
}

// Apply records what ev says about its box in the store: an exit of the
// box's process, its start, an OOM kill, a pause. Events for boxes the
// store does not hold, and exec events, change nothing.
func (s *Store) Apply(ev Event) error {
	if ev.ID == "" || ev.ExecID != "" {
		return nil
	}
	var fn func(*Record) error
	switch m := ev.Payload.(type) {
	case *eventtypes.TaskExit:
		fn = func(r *Record) error {
			r.markStopped(ev.ExitStatus, ev.ExitedAt)
			return nil
		}
	case *eventtypes.TaskDelete:
		fn = func(r *Record) error {
			r.markStopped(m.GetExitStatus(), m.GetExitedAt().AsTime())
			return nil
		}
	case *eventtypes.TaskStart:
		fn = func(r *Record) error {
			if r.Status == StatusCreated || r.Status == StatusUnknown {
				r.Status, r.TaskPid = StatusRunning, ev.Pid
			}
			return nil
		}
	case *eventtypes.TaskOOM:
		fn = func(r *Record) error { r.OOMKilled = true; return nil }
	case *eventtypes.TaskPaused:
		fn = func(r *Record) error {
			if r.Status == StatusRunning {
				r.Status = StatusPaused
			}
			return nil
		}
	case *eventtypes.TaskResumed:
		fn = func(r *Record) error {
			if r.Status == StatusPaused {
				r.Status = StatusRunning
			}
			return nil
		}
	case *healthapi.TaskHealth:
		fn = func(r *Record) error { r.Health = m.GetStatus(); return nil }
	default:
		return nil
	}
	_, err := s.Update(ev.ID, fn)
	if errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

// EventServer serves containerd's events ttrpc service on the state
// directory's events socket, the TTRPC_ADDRESS of every shim the manager
// starts. Only one process serves it at a time (it holds events.lock).
type EventServer struct {
	store   *Store
	handler func(Event)
	lock    *os.File
	l       net.Listener
	srv     *ttrpc.Server
	done    chan struct{}

	// mu orders handler calls. Guarded: the handler runs under it.
	mu sync.Mutex
}

var _ eventsapi.TTRPCEventsService = (*EventServer)(nil)

// EventsSocket is the events socket of the store: the shims' TTRPC_ADDRESS.
func (s *Store) EventsSocket() string { return filepath.Join(s.root, eventsSocketName) }

// ServeEvents starts serving events. Each event is applied to the store and
// then passed to handler (which may be nil), one at a time in arrival order.
// If another process serves the socket the error is ErrEventsBusy.
func ServeEvents(store *Store, handler func(Event)) (*EventServer, error) {
	lock, err := os.OpenFile(filepath.Join(store.root, eventsLockName), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("events lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w on %s", ErrEventsBusy, store.EventsSocket())
		}
		return nil, os.NewSyscallError("flock", err)
	}
	sock := store.EventsSocket()
	// A socket left by a manager that died: we hold the lock, so it is stale.
	os.Remove(sock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("events socket: %w", err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		l.Close()
		lock.Close()
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	s := &EventServer{store: store, handler: handler, lock: lock, l: l, srv: srv, done: make(chan struct{})}
	eventsapi.RegisterTTRPCEventsService(srv, s)
	go func() {
		defer close(s.done)
		if err := srv.Serve(context.Background(), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
			log.L.WithError(err).Warn("events server stopped")
		}
	}()
	return s, nil
}

// Forward receives one event from a shim.
func (s *EventServer) Forward(ctx context.Context, req *eventsapi.ForwardRequest) (*emptypb.Empty, error) {
	ev, err := DecodeEnvelope(req.GetEnvelope())
	if err != nil {
		log.G(ctx).WithError(err).Warn("undecodable event")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.store.Apply(ev); err != nil {
		log.G(ctx).WithError(err).WithField("id", ev.ID).Warn("record event")
	}
	if s.handler != nil {
		s.handler(ev)
	}
	return &emptypb.Empty{}, nil
}

// Close stops serving and releases the lock. The socket file stays: a shim
// publishing while no manager serves it gets "connection refused" at once,
// where a missing socket would make it retry its dial for seconds per event
// (and delay its shutdown by as much).
func (s *EventServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = s.srv.Close()
	}
	<-s.done
	s.lock.Close()
	return err
}

// ensureEventsSocket leaves a socket file with no listener at the events
// socket path if there is none, for the reason Close keeps it.
func (s *Store) ensureEventsSocket() error {
	path := s.EventsSocket()
	if _, err := os.Lstat(path); err == nil {
		return nil
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return nil // created meanwhile
		}
		return fmt.Errorf("events socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	return l.Close()
}
