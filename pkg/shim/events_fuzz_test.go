package shim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cg2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/agent/api"
)

// The fuzz targets of what the shim makes of the guest's answers: its
// events and exits (pollGuest, resync) and the figures it passes on to
// containerd (Stats, Pids). The guest's bytes reach the shim through the
// real agent.Client; pkg/agent's fuzz targets cover the client itself.

// fuzzTimeout bounds every wait of these targets; nothing may reach it.
const fuzzTimeout = 5 * time.Second

// maxFuzzInput bounds the inputs the targets try: larger ones test nothing
// more, and the fuzzer's minimization of an input takes time with its size.
const maxFuzzInput = 1 << 10

// guestReply answers one call with a raw reply payload, or an error.
type guestReply func(req []byte) ([]byte, error)

// rawReply is a message that marshals to exactly payload.
func rawReply(payload []byte) proto.Message {
	m := &api.Empty{}
	m.ProtoReflect().SetUnknown(payload)
	return m
}

// encodeReply encodes m; the scripted guest's answers cannot fail to encode.
func encodeReply(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// scriptedAgent serves the agent API on a socket in a temporary directory
// with a real ttrpc server whose methods answer as replies says (Ping
// answers by itself), dials it with agent.Dial, as a sandbox does, and
// returns the client. Everything is closed at cleanup.
func scriptedAgent(t *testing.T, replies map[string]guestReply) *agent.Client {
	t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatalf("new ttrpc server: %v", err)
	}
	desc := &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{}}
	replies["Ping"] = func([]byte) ([]byte, error) { return encodeReply(&api.PingResponse{Version: "fuzz"}), nil }
	for name, reply := range replies {
		desc.Methods[name] = func(_ context.Context, unmarshal func(any) error) (any, error) {
			var req api.Empty // the request's fields stay raw, as unknown fields
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			payload, err := reply(req.ProtoReflect().GetUnknown())
			if err != nil {
				return nil, err
			}
			return rawReply(payload), nil
		}
	}
	srv.RegisterService("boxlite.agent.v1.Agent", desc)
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(context.Background(), ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-served
	})
	ctx, cancel := context.WithTimeout(context.Background(), fuzzTimeout)
	defer cancel()
	a, _, err := agent.Dial(ctx, path)
	if err != nil {
		t.Fatalf("dial the scripted agent: %v", err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

// exitBits encodes a WaitProcess answer of resync in one fuzz byte: bit 0
// exited, bit 1 OOM killed, the rest the exit status.
func exitBits(b byte) *api.WaitProcessResponse {
	return &api.WaitProcessResponse{Exited: b&1 != 0, OomKilled: b&2 != 0, ExitStatus: uint32(b >> 2), ExitedAtUnixNs: 42}
}

// byteAt returns b[i], or 0 past its end.
func byteAt(b []byte, i int) byte {
	if i < len(b) {
		return b[i]
	}
	return 0
}

// FuzzPollGuestEvents feeds pollGuest one Events answer of arbitrary bytes
// and, when it says events were missed, the resync's WaitProcess answers
// (a byte per process, exitBits), then the VM's death. Two containers run:
// c1 (init, execs e1 and e2) and c2 (init). Invariants: every process gets
// exactly one TaskExit, with the first exit the guest reported for it
// (resync's first, then the events in order) or the VM-death 137; an init's
// TaskExit follows its execs'; one TaskOOM goes out for each known
// container the guest reported OOMs for (all within oomQuiet, an hour
// here: the rest are folded into it), and nothing at all for unknown
// containers or execs; the next poll asks for the events after the last
// seq received; an undecodable answer is not trusted at all.
func FuzzPollGuestEvents(f *testing.F) {
	ev := func(r *api.EventsResponse) []byte { return encodeReply(r) }
	exit := func(seq uint64, id, exec string, st uint32) *api.Event {
		return &api.Event{Seq: seq, Kind: api.EventKind_EXIT, Id: id, ExecId: exec, ExitStatus: st, TimeUnixNs: 7}
	}
	f.Add(ev(&api.EventsResponse{Events: []*api.Event{
		{Seq: 1, Kind: api.EventKind_OOM, Id: "c1"},
		exit(2, "c1", "", 0), exit(3, "c1", "e1", 3), exit(4, "c1", "e1", 4), exit(5, "c2", "", 1),
	}}), []byte(nil))
	f.Add(ev(&api.EventsResponse{Events: []*api.Event{exit(9, "c1", "e2", 2), exit(10, "nope", "", 5), exit(8, "c2", "nope", 6)}, Missed: true}),
		[]byte{0x07, 0x00, 0x0d, 0x01})
	f.Add(ev(&api.EventsResponse{Events: []*api.Event{{Seq: 3, Kind: api.EventKind(9), Id: "c2"}}}), []byte{})
	f.Add([]byte{0x0a, 0xff}, []byte{1, 1, 1, 1})
	quiet := oomQuiet
	oomQuiet = time.Hour
	f.Cleanup(func() { oomQuiet = quiet })
	f.Fuzz(func(t *testing.T, events, waits []byte) {
		if len(events) > maxFuzzInput || len(waits) > 16 {
			return
		}
		c1, c2 := testContainer("c1", "e1", "e2"), testContainer("c2")
		procs := []*process{c1.init, c1.execs["e1"], c1.execs["e2"], c2.init}
		byID := map[string]*container{"c1": c1, "c2": c2}
		var m api.EventsResponse
		decodes := proto.Unmarshal(events, &m) == nil

		done := make(chan struct{})
		var (
			mu     sync.Mutex
			afters []uint64
			waited []string
		)
		a := scriptedAgent(t, map[string]guestReply{
			"Events": func(req []byte) ([]byte, error) {
				var r api.EventsRequest
				if err := proto.Unmarshal(req, &r); err != nil {
					return nil, err
				}
				mu.Lock()
				defer mu.Unlock()
				afters = append(afters, r.After)
				switch len(afters) {
				case 1:
					if !decodes {
						close(done) // the failed poll finds the VM dead
					}
					return events, nil
				case 2:
					close(done)
					return encodeReply(&api.EventsResponse{}), nil
				}
				return nil, errors.New("polled after the VM died")
			},
			"WaitProcess": func(req []byte) ([]byte, error) {
				var r api.WaitProcessRequest
				if err := proto.Unmarshal(req, &r); err != nil {
					return nil, err
				}
				mu.Lock()
				defer mu.Unlock()
				waited = append(waited, r.Id+"/"+r.ExecId)
				for i, p := range procs {
					if p.id == r.Id && p.execID == r.ExecId {
						return encodeReply(exitBits(byteAt(waits, i))), nil
					}
				}
				return nil, fmt.Errorf("resync of unknown process %s/%s", r.Id, r.ExecId)
			},
		})
		l, rec := testLoop(t, c1, c2)
		polled := make(chan struct{})
		go func() {
			defer close(polled)
			l.pollGuest(a, done, func(id string) *container { return byID[id] })
		}()
		for what, ch := range map[string]chan struct{}{"pollGuest": polled, "the exit loop": l.done} {
			select {
			case <-ch:
			case <-time.After(fuzzTimeout):
				t.Fatalf("%s still runs after the VM died", what)
			}
		}
		l.pub.close() // flushes every event to rec

		// The model: the first exit reported for a process wins.
		exits := map[*process]uint32{}
		ooms := map[string]int{}
		first := func(p *process, st uint32) {
			if _, ok := exits[p]; !ok {
				exits[p] = st
			}
		}
		wantAfter := uint64(0)
		if decodes && m.Missed {
			for i, p := range procs {
				if w := exitBits(byteAt(waits, i)); w.Exited {
					if w.OomKilled {
						ooms[p.id] = 1
					}
					first(p, w.ExitStatus)
				}
			}
		}
		for _, e := range m.Events {
			if !decodes {
				break // a partial decode means nothing
			}
			wantAfter = e.Seq
			c := byID[e.Id]
			if c == nil {
				continue
			}
			switch e.Kind {
			case api.EventKind_OOM:
				ooms[c.id] = 1
			case api.EventKind_EXIT:
				if p, err := c.process(e.ExecId); err == nil {
					first(p, e.ExitStatus)
				}
			}
		}
		var want []string
		for _, p := range procs {
			first(p, exitStatusVMDied)
			want = append(want, fmt.Sprintf("exit %s/%s %d", p.id, p.execIDOrID(), exits[p]))
		}
		for id, n := range ooms {
			for range n {
				want = append(want, "oom "+id)
			}
		}

		got := rec.events()
		if !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(want))) {
			t.Fatalf("published %q, want (in any order) %q", got, want)
		}
		for _, exec := range []string{"e1", "e2"} {
			if slices.Index(got, fmt.Sprintf("exit c1/%s %d", exec, exits[c1.execs[exec]])) > slices.Index(got, fmt.Sprintf("exit c1/c1 %d", exits[c1.init])) {
				t.Fatalf("c1's init exit was published before its exec %s's: %q", exec, got)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		switch {
		case !decodes && len(afters) != 1:
			t.Fatalf("polled %d times after an undecodable answer, want once (the VM died)", len(afters))
		case decodes && (len(afters) != 2 || afters[1] != wantAfter):
			t.Fatalf("polled %d times asking for events after %v, want twice, then after %d", len(afters), afters, wantAfter)
		case (!decodes || !m.Missed) && len(waited) != 0:
			t.Fatalf("resync asked for %q without missed events", waited)
		case decodes && m.Missed && len(waited) != len(procs):
			t.Fatalf("resync asked for %q, want each of the %d running processes", waited, len(procs))
		}
	})
}

// agentVM is a fakeVM whose agent is a real client.
type agentVM struct {
	*fakeVM
	a *agent.Client
}

func (v agentVM) Agent() *agent.Client { return v.a }

// FuzzGuestFigures feeds the shim's Stats an arbitrary metrics blob (in a
// well-formed StatsResponse) and its Pids an arbitrary ListPids answer.
// Invariants: Stats passes on exactly the cgroup v2 metrics the blob
// decodes to, as an Any containerd can decode, or fails with DataLoss;
// Pids lists exactly the guest's pids, in order, or fails; neither takes
// a bad answer for a success.
func FuzzGuestFigures(f *testing.F) {
	metrics := encodeReply(&cg2stats.Metrics{Pids: &cg2stats.PidsStat{Current: 3, Limit: 10},
		Memory: &cg2stats.MemoryStat{Usage: 1 << 20, UsageLimit: 1 << 30}, CPU: &cg2stats.CPUStat{UsageUsec: 5}})
	f.Add(false, metrics)
	f.Add(false, []byte{0x0a, 0x80})
	f.Add(true, encodeReply(&api.ListPidsResponse{Pids: []uint32{1, 7, 1 << 31}}))
	f.Add(true, []byte{0x0a, 0x03, 0x01, 0x02})
	f.Fuzz(func(t *testing.T, pids bool, payload []byte) {
		if len(payload) > maxFuzzInput {
			return
		}
		a := scriptedAgent(t, map[string]guestReply{
			"Stats":    func([]byte) ([]byte, error) { return encodeReply(&api.StatsResponse{Metrics: payload}), nil },
			"ListPids": func([]byte) ([]byte, error) { return payload, nil },
		})
		c := testContainer("c1")
		s := &service{containers: map[string]*container{"c1": c}, sb: &sandbox{id: "c1", vm: agentVM{newFakeVM(), a}}}
		ctx, cancel := context.WithTimeout(context.Background(), fuzzTimeout)
		defer cancel()

		if pids {
			resp, err := s.Pids(ctx, &taskAPI.PidsRequest{ID: "c1"})
			var want api.ListPidsResponse
			if proto.Unmarshal(payload, &want) != nil {
				if err == nil {
					t.Fatalf("Pids took an undecodable answer %x for %v", payload, resp)
				}
				return
			}
			if err != nil {
				t.Fatalf("Pids: %v", err)
			}
			var got []uint32
			for _, p := range resp.Processes {
				got = append(got, p.Pid)
			}
			if !slices.Equal(got, want.Pids) {
				t.Fatalf("Pids listed %v, the guest sent %v", got, want.Pids)
			}
			return
		}

		resp, err := s.Stats(ctx, &taskAPI.StatsRequest{ID: "c1"})
		var want cg2stats.Metrics
		if derr := proto.Unmarshal(payload, &want); derr != nil {
			if !errdefs.IsDataLoss(errgrpc.ToNative(err)) || !strings.Contains(err.Error(), "undecodable metrics") {
				t.Fatalf("Stats of undecodable metrics %x (%v) = (%v, %v), want a DataLoss error", payload, derr, resp, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Stats: %v", err)
		}
		v, err := typeurl.UnmarshalAny(resp.Stats)
		if err != nil {
			t.Fatalf("containerd cannot decode the Stats Any %v: %v", resp.Stats.GetTypeUrl(), err)
		}
		if got, ok := v.(*cg2stats.Metrics); !ok || !proto.Equal(got, &want) {
			t.Fatalf("Stats passed on %v, the guest sent %v", v, &want)
		}
	})
}
