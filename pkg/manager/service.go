package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/api"
)

// Bounds of Service operations.
const (
	// defaultStopTimeout is how long Stop waits after its signal before
	// SIGKILL, as docker stop does.
	defaultStopTimeout = 10 * time.Second
	// exitEventTimeout bounds the wait for a box's own TaskExit event
	// once its Wait returned: the shim publishes an OOM kill before the
	// exit, so the record then says whether the box was OOM-killed.
	exitEventTimeout = 2 * time.Second
	// eventBuffer is how many events a subscriber may lag behind before
	// it is dropped: a slow reader never blocks the shims' publishing.
	eventBuffer = 1024
)

// ServiceConfig configures a Service.
type ServiceConfig struct {
	Config
	// Daemon makes a long-lived service: it must own the events socket,
	// watches every box's shim (a shim that dies is reaped by this
	// process's reaper, its box stopped with 137 and its VM removed at
	// once) and removes auto_remove boxes when they exit.
	Daemon bool
}

// Service is the manager behind api.Boxes: the CLI's local mode and the
// daemon run every operation through it. Every box it creates gets the same
// stdio: a framed log (box.log, written by the shim, so it outlives any
// manager process) and, with OpenStdin, a stdin FIFO the first attach
// writes to.
type Service struct {
	m      *Manager
	daemon bool
	// es serves the events socket; nil when another process does.
	es *EventServer
	// bus fans events out to subscribers.
	bus *eventBus

	// ctx ends at Close and cancels background work, tracked by wg.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// mu guards watching and stdins.
	mu sync.Mutex
	// watching maps a box id to the watch on its shim. Guarded by mu.
	watching map[string]*shimWatch
	// stdins holds the write end of the stdin FIFO of each box created
	// with OpenStdin, until its first attach takes it. The shim opens its
	// end during Create and gives up if no writer is there, so the writer
	// is opened then and kept by the creating process. Guarded by mu.
	stdins map[string]io.WriteCloser
}

var _ api.Boxes = (*Service)(nil)

// NewService opens the state directory. A daemon must own the events
// socket (ErrEventsBusy otherwise) and recovers every box in it; a local
// service serves events while it is open if no other process does.
func NewService(cfg ServiceConfig) (*Service, error) {
	m, err := New(cfg.Config)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{m: m, daemon: cfg.Daemon, bus: newEventBus(), ctx: ctx, cancel: cancel, watching: map[string]*shimWatch{}, stdins: map[string]io.WriteCloser{}}
	es, err := ServeEvents(m.store, s.onEvent)
	switch {
	case err == nil:
		s.es = es
	case cfg.Daemon:
		cancel()
		return nil, err
	case !errors.Is(err, ErrEventsBusy):
		log.L.WithError(err).Debug("not serving events")
	}
	if cfg.Daemon {
		s.recover()
	}
	return s, nil
}

// Manager is the manager the service drives.
func (s *Service) Manager() *Manager { return s.m }

// Close stops serving events and watching shims. Boxes keep running.
func (s *Service) Close() error {
	s.cancel()
	s.mu.Lock()
	for id, w := range s.watching {
		w.close()
		delete(s.watching, id)
	}
	for id, w := range s.stdins {
		w.Close()
		delete(s.stdins, id)
	}
	s.mu.Unlock()
	var err error
	if s.es != nil {
		err = s.es.Close()
	}
	s.wg.Wait()
	s.bus.close()
	return err
}

// Create makes a box from a request: its output goes to its framed log.
func (s *Service) Create(ctx context.Context, req api.CreateRequest) (string, error) {
	o, err := CreateOptionsFromRequest(req)
	if err != nil {
		return "", err
	}
	var stdin io.WriteCloser
	o.Stdio = func(dir string) (Stdio, error) {
		st, err := boxStdio(dir, "box", o.OpenStdin, o.Spec.Terminal)
		if err == nil && st.Stdin != "" {
			stdin, err = openStdinWriter(s.ctx, st.Stdin)
		}
		return st, err
	}
	b, err := s.m.Create(ctx, o)
	if err != nil {
		if stdin != nil {
			stdin.Close()
		}
		return "", err
	}
	if stdin != nil {
		s.mu.Lock()
		s.stdins[b.ID()] = stdin
		s.mu.Unlock()
	}
	defer b.Close()
	s.watchShim(b.Record())
	return b.ID(), nil
}

// get finds a box and reconciles it (see Manager.Get).
func (s *Service) get(ctx context.Context, ref string) (*Box, error) {
	return s.m.Get(ctx, ref)
}

// Start starts a created box's process.
func (s *Service) Start(ctx context.Context, ref string) error {
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	if st := b.Record().Status; st != StatusCreated {
		return errorf(errdefs.ErrFailedPrecondition, "box %s is %s: only a created box can be started", ref, st)
	}
	_, err = b.Start(ctx, "")
	return err
}

// Stop signals the box's process, SIGKILLs it after the timeout, and tears
// its VM and shim down, keeping the record.
func (s *Service) Stop(ctx context.Context, ref string, req api.StopRequest) error {
	sig, err := api.ParseSignal(req.Signal, syscall.SIGTERM)
	if err != nil {
		return err
	}
	timeout := defaultStopTimeout
	if req.Timeout != "" {
		if timeout, err = time.ParseDuration(req.Timeout); err != nil || timeout < 0 {
			return errorf(errdefs.ErrInvalidArgument, "timeout %q: want a duration such as 10s", req.Timeout)
		}
	}
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	if r := b.Record(); r.Status == StatusRunning || r.Status == StatusPaused {
		if err := b.Kill(ctx, "", sig, false); err == nil {
			wctx, cancel := context.WithTimeout(ctx, timeout)
			_, err = b.Wait(wctx, "")
			cancel()
		}
		if err != nil {
			log.G(ctx).WithError(err).WithField("id", r.ID).Debug("stop: killing")
		}
	}
	// Teardown SIGKILLs whatever still runs, through the one kill path,
	// and reaps the shim itself: a daemon's watch must not take its exit
	// for a death and clean up after it meanwhile.
	s.dropWatch(b.ID(), nil)
	if err := b.teardown(context.WithoutCancel(ctx), true); err != nil {
		s.rewatch(b.ID())
		return err
	}
	return nil
}

// Kill sends a signal to the box's process.
func (s *Service) Kill(ctx context.Context, ref string, req api.KillRequest) error {
	sig, err := api.ParseSignal(req.Signal, syscall.SIGTERM)
	if err != nil {
		return err
	}
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	return b.Kill(ctx, "", sig, req.All)
}

// Remove removes a box: a running one only with force (killed first).
func (s *Service) Remove(ctx context.Context, ref string, force bool) error {
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	id := b.ID()
	if w := s.takeStdin(id); w != nil {
		w.Close()
	}
	// The teardown reaps the shim itself.
	s.dropWatch(id, nil)
	err = b.Remove(context.WithoutCancel(ctx), force)
	if err != nil {
		s.rewatch(id)
	}
	return err
}

// List reconciles and returns the boxes that pass the filter.
func (s *Service) List(ctx context.Context, f api.ListFilter) ([]api.Box, error) {
	recs, err := s.m.List(ctx)
	out := []api.Box{}
	for _, r := range recs {
		if b := r.API(); f.Match(b) {
			out = append(out, b)
		}
	}
	return out, err
}

// Inspect returns a box's reconciled record.
func (s *Service) Inspect(ctx context.Context, ref string) (api.Box, error) {
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Box{}, err
	}
	defer b.Close()
	return b.Record().API(), nil
}

// Wait waits for the box's process to exit.
func (s *Service) Wait(ctx context.Context, ref string) (api.Exit, error) {
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Exit{}, err
	}
	defer b.Close()
	return s.wait(ctx, b)
}

// wait waits for the box's own process; a stopped box answers its recorded
// exit.
func (s *Service) wait(ctx context.Context, b *Box) (api.Exit, error) {
	r := b.Record()
	if r.Status == StatusStopped {
		return api.Exit{Status: r.ExitStatus, At: r.ExitedAt}, nil
	}
	var exited <-chan api.Event
	if s.es != nil {
		sub := s.bus.subscribe()
		defer s.bus.unsubscribe(sub)
		exited = sub.ch
	}
	e, err := b.Wait(ctx, "")
	if err != nil {
		return api.Exit{}, err
	}
	if exited != nil {
		// Let the exit event (and an OOM kill before it) be recorded.
		t := time.NewTimer(exitEventTimeout)
		defer t.Stop()
	wait:
		for {
			select {
			case ev, ok := <-exited:
				if !ok || ev.Exited && ev.ID == r.ID && ev.ExecID == "" {
					break wait
				}
			case <-t.C:
				break wait
			}
		}
	}
	return api.Exit{Status: e.Status, At: e.At}, nil
}

// Events calls fn for every event until ctx ends. It needs this process to
// serve the events socket.
func (s *Service) Events(ctx context.Context, fn func(api.Event)) error {
	if s.es == nil {
		return fmt.Errorf("%w: stop it first (only one listener can own the socket)", ErrEventsBusy)
	}
	sub := s.bus.subscribe()
	defer s.bus.unsubscribe(sub)
	for {
		select {
		case ev, ok := <-sub.ch:
			if !ok {
				return sub.err()
			}
			fn(ev)
		case <-ctx.Done():
			return nil
		}
	}
}
