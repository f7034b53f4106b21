package manager

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func envelope(t *testing.T, topic string, ev proto.Message) *types.Envelope {
	t.Helper()
	a, err := anypb.New(ev)
	if err != nil {
		t.Fatal(err)
	}
	return &types.Envelope{Timestamp: timestamppb.New(time.Unix(1700000000, 0)), Namespace: Namespace, Topic: topic, Event: a}
}

// forward sends one envelope to the events socket like a shim does.
func forward(t *testing.T, s *Store, env *types.Envelope) {
	t.Helper()
	conn, err := net.Dial("unix", s.EventsSocket())
	if err != nil {
		t.Fatal(err)
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := eventsapi.NewTTRPCEventsClient(c).Forward(ctx, &eventsapi.ForwardRequest{Envelope: env}); err != nil {
		t.Fatal(err)
	}
}

func TestForwardedTaskExitUpdatesTheRecord(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "abc123", "")
	s.Update("abc123", func(r *Record) error { r.Status = StatusRunning; return nil })
	var got []Event
	es, err := ServeEvents(s, func(ev Event) { got = append(got, ev) })
	if err != nil {
		t.Fatal(err)
	}
	forward(t, s, envelope(t, "/tasks/oom", &eventtypes.TaskOOM{ContainerID: "abc123"}))
	forward(t, s, envelope(t, "/tasks/exit", &eventtypes.TaskExit{ContainerID: "abc123", ID: "abc123", Pid: 42, ExitStatus: 137,
		ExitedAt: timestamppb.New(time.Unix(1700000001, 0))}))
	forward(t, s, envelope(t, "/tasks/exit", &eventtypes.TaskExit{ContainerID: "abc123", ID: "exec-1", ExitStatus: 5}))
	forward(t, s, envelope(t, "/tasks/exit", &eventtypes.TaskExit{ContainerID: "unknown", ID: "unknown", ExitStatus: 1}))
	if err := es.Close(); err != nil {
		t.Fatal(err)
	}
	rec, err := s.Get("abc123")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != StatusStopped || rec.ExitStatus != 137 || !rec.OOMKilled || !rec.ExitedAt.Equal(time.Unix(1700000001, 0)) {
		t.Errorf("record after exit events: %+v", rec)
	}
	want := []string{
		"2023-11-14T22:13:20Z /tasks/oom abc123",
		"2023-11-14T22:13:20Z /tasks/exit abc123 137",
		"2023-11-14T22:13:20Z /tasks/exit abc123 exec-1 5",
		"2023-11-14T22:13:20Z /tasks/exit unknown 1",
	}
	if len(got) != len(want) {
		t.Fatalf("handler got %d events, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("event %d prints %q, want %q", i, got[i].String(), want[i])
		}
	}
}

func TestOnlyOneProcessServesEvents(t *testing.T) {
	s := newTestStore(t)
	es, err := ServeEvents(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Another manager process is another open file description: flock
	// conflicts between them, as it does here.
	_, err = ServeEvents(s, nil)
	if !errors.Is(err, ErrEventsBusy) || !strings.Contains(err.Error(), s.EventsSocket()) {
		t.Fatalf("second listener: %v", err)
	}
	es.Close()
	// The socket stays (refusing connections) so shims fail fast; a new
	// listener takes it over.
	if _, err := net.Dial("unix", s.EventsSocket()); err == nil {
		t.Error("closed events socket still accepts")
	}
	es, err = ServeEvents(s, nil)
	if err != nil {
		t.Fatalf("listener after the first closed: %v", err)
	}
	es.Close()
}

func TestDecodeEnvelopeNamesUnknownTypes(t *testing.T) {
	ev, err := DecodeEnvelope(&types.Envelope{Topic: "/x", Event: &anypb.Any{TypeUrl: "example.com/Nope"}})
	if err == nil || ev.Topic != "/x" || ev.Payload != nil {
		t.Errorf("unknown type: %+v, %v", ev, err)
	}
	if _, err := DecodeEnvelope(nil); err == nil {
		t.Error("nil envelope decoded")
	}
}
