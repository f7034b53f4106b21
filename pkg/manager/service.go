package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/logfile"
	"github.com/boxlite/boxlite/pkg/reaper"
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

// recover reconciles every record (dead shims are cleaned up and their
// boxes stopped) and watches the live shims.
func (s *Service) recover() {
	recs, err := s.m.List(s.ctx)
	if err != nil {
		log.L.WithError(err).Warn("recovering boxes")
	}
	for _, r := range recs {
		if r.ShimPid > 0 {
			s.watchShim(r)
		}
	}
	log.L.WithField("boxes", len(recs)).Info("recovered boxes")
}

// shimWatch is a daemon's watch on one box's shim.
type shimWatch struct {
	// release releases the reaper's watch.
	release func()
	// unwatched is closed when the watch is dropped: its goroutine ends.
	unwatched chan struct{}
}

// close ends the watch. It is called once, by whoever removes the watch
// from watching (holding mu).
func (w *shimWatch) close() {
	w.release()
	close(w.unwatched)
}

// watchShim makes a daemon notice the death of box r's shim at once.
func (s *Service) watchShim(r Record) {
	if !s.daemon || r.ShimPid <= 0 {
		return
	}
	exited, release, err := reaper.Default().Watch(r.ShimIdentity())
	if err != nil {
		log.L.WithError(err).WithField("id", r.ID).Warn("cannot watch shim")
		return
	}
	w := &shimWatch{release: release, unwatched: make(chan struct{})}
	s.mu.Lock()
	if old, ok := s.watching[r.ID]; ok {
		old.close()
	}
	s.watching[r.ID] = w
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-exited:
			// Unless Stop or Remove, which reap the shim themselves,
			// dropped the watch first.
			if s.dropWatch(r.ID, w) {
				s.shimExited(r.ID, r.ShimPid)
			}
		case <-w.unwatched:
		case <-s.ctx.Done():
		}
	}()
}

// dropWatch ends the watch on box id's shim if it is w (any watch when w
// is nil) and reports whether it was.
func (s *Service) dropWatch(id string, w *shimWatch) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok := s.watching[id]
	if !ok || w != nil && cur != w {
		return false
	}
	delete(s.watching, id)
	cur.close()
	return true
}

// shimExited handles the death of a box's shim (reaped already when it was
// our child): if the box was not being torn down, its VM is cleaned up, it
// is marked stopped with 137 and an exit event says so.
func (s *Service) shimExited(id string, pid int) {
	before, err := s.m.store.Get(id)
	if err != nil || before.ShimPid != pid {
		return // removed, or torn down and restarted meanwhile
	}
	b, err := s.m.Get(s.ctx, id)
	if err != nil {
		log.L.WithError(err).WithField("id", id).Warn("cleaning up after a dead shim")
		return
	}
	after := b.Record()
	b.Close()
	log.L.WithField("id", id).WithField("pid", pid).Info("shim exited")
	if before.Status != StatusStopped && after.Status == StatusStopped {
		s.bus.publish(api.Event{Time: time.Now(), Topic: "/tasks/exit", ID: id, Exited: true, ExitStatus: after.ExitStatus})
		s.autoRemove(after)
	}
}

// onEvent receives every event a shim publishes (already recorded in the
// store) and fans it out.
func (s *Service) onEvent(ev Event) {
	s.bus.publish(ev.API())
	if !s.daemon {
		return
	}
	if _, ok := ev.Payload.(*eventtypes.TaskExit); ok && ev.ExecID == "" {
		if r, err := s.m.store.Get(ev.ID); err == nil {
			s.autoRemove(*r)
		}
	}
}

// autoRemove removes an auto_remove box in the background (never from the
// events handler, which the shim waits on).
func (s *Service) autoRemove(r Record) {
	if !s.daemon || !r.AutoRemove {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.Remove(context.WithoutCancel(s.ctx), r.ID, true); err != nil && !errdefs.IsNotFound(err) {
			log.L.WithError(err).WithField("id", r.ID).Warn("auto-remove")
		}
	}()
}

// API is the event as the API and boxlite events show it.
func (e Event) API() api.Event {
	return api.Event{
		Time: e.Time, Topic: e.Topic, ID: e.ID, ExecID: e.ExecID, Pid: e.Pid,
		Exited: e.Exited, ExitStatus: e.ExitStatus, Health: e.Health,
	}
}

// API is the record as the API and boxlite inspect show it.
func (r Record) API() api.Box {
	b := api.Box{
		ID: r.ID, Name: r.Name, Image: r.Image, Bundle: r.Bundle, Rootfs: r.Rootfs, Command: r.Command,
		Terminal: r.Terminal, Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr,
		ShimAddress: r.ShimAddress, ShimPid: r.ShimPid, ShimStartTime: r.ShimStartTime,
		VMMPid: r.VMMPid, VMMStartTime: r.VMMStartTime, TaskPid: r.TaskPid,
		Status: string(r.Status), ExitStatus: r.ExitStatus, ExitedAt: r.ExitedAt,
		OOMKilled: r.OOMKilled, Health: r.Health, Network: r.Network, Ports: r.Ports,
		Labels: r.Labels, AutoRemove: r.AutoRemove, CreatedAt: r.CreatedAt,
	}
	for _, i := range r.Interfaces {
		b.Interfaces = append(b.Interfaces, api.Interface{Name: i.Name, MAC: i.MAC, Addresses: i.Addresses})
	}
	return b
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

// boxStdio makes the stdio of a process named name in box directory dir:
// an empty framed log io/name.log ("box" logs to box.log) and, with stdin,
// a FIFO.
func boxStdio(dir, name string, stdin, terminal bool) (Stdio, error) {
	logPath := filepath.Join(dir, logFileName)
	if name != "box" {
		logPath = filepath.Join(dir, ioDirName, name+".log")
	}
	if err := os.MkdirAll(filepath.Join(dir, ioDirName), 0o700); err != nil {
		return Stdio{}, err
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return Stdio{}, fmt.Errorf("log file: %w", err)
	}
	f.Close()
	u := (&url.URL{Scheme: "file", Path: logPath, RawQuery: "format=framed"}).String()
	st := Stdio{Stdout: u, Stderr: u}
	if terminal {
		st.Stderr = ""
	}
	if stdin {
		st.Stdin = filepath.Join(dir, ioDirName, name+".stdin")
		if err := mkfifo(st.Stdin); err != nil {
			return Stdio{}, err
		}
	}
	return st, nil
}

// openStdinWriter opens the write end of a stdin FIFO without waiting for
// the shim to open the other (the open completes when it does, or fails
// when ctx ends first).
func openStdinWriter(ctx context.Context, path string) (io.WriteCloser, error) {
	w, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open stdin: %w", err)
	}
	return w, nil
}

// takeStdin hands over the held stdin writer of box id, once.
func (s *Service) takeStdin(id string) io.WriteCloser {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.stdins[id]
	delete(s.stdins, id)
	return w
}

// logPathOf is the framed log a Stdio names, or "".
func logPathOf(stdout string) string {
	u, err := url.Parse(stdout)
	if err != nil || u.Scheme != "file" || u.Query().Get("format") != "framed" {
		return ""
	}
	return u.Path
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

// rewatch watches box id's shim again after a teardown that failed (one
// that could not be reaped is still there).
func (s *Service) rewatch(id string) {
	if r, err := s.m.store.Get(id); err == nil {
		s.watchShim(*r)
	}
}

// mkfifo makes a FIFO at path, replacing any file there.
func mkfifo(path string) error {
	os.Remove(path)
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return &os.PathError{Op: "mkfifo", Path: path, Err: err}
	}
	return nil
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

// Logs writes the box's output; with Follow until its process exited.
func (s *Service) Logs(ctx context.Context, ref string, o api.LogsOptions, stdout, stderr io.Writer) error {
	b, err := s.get(ctx, ref)
	if err != nil {
		return err
	}
	defer b.Close()
	path := logPathOf(b.Record().Stdout)
	if path == "" {
		return errorf(errdefs.ErrFailedPrecondition, "box %s keeps no log (its output was not sent to one)", ref)
	}
	done := make(chan struct{})
	if o.Follow && b.Record().Status != StatusStopped {
		go func() {
			defer close(done)
			b.Wait(ctx, "")
		}()
	} else {
		close(done)
	}
	return readLog(ctx, path, o.Since, o.Follow, done, stdout, stderr)
}

// readLog copies a framed log's frames to stdout and stderr.
func readLog(ctx context.Context, path string, since time.Time, follow bool, done <-chan struct{}, stdout, stderr io.Writer) error {
	return logfile.Read(ctx, path, logfile.ReadOptions{Since: since, Follow: follow, Done: done}, func(f logfile.Frame) error {
		w := stdout
		if f.Stream == logfile.Stderr {
			w = stderr
		}
		if w == nil {
			return nil
		}
		_, err := w.Write(f.Data)
		return err
	})
}

// Attach relays the box's output from its start, its stdin, terminal sizes
// and signals until its process exits.
func (s *Service) Attach(ctx context.Context, ref string, stdio api.Stdio) (api.Exit, error) {
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Exit{}, err
	}
	defer b.Close()
	r := b.Record()
	path := logPathOf(r.Stdout)
	if path == "" {
		return api.Exit{}, errorf(errdefs.ErrFailedPrecondition, "box %s keeps no log to attach to", ref)
	}
	var stdin io.WriteCloser
	if stdio.Stdin != nil {
		stdin = s.takeStdin(r.ID)
	}
	return s.relay(ctx, b, "", path, stdin, stdio, func(ctx context.Context) (api.Exit, error) { return s.wait(ctx, b) })
}

// relay is Attach's and Exec's loop: output from the framed log at path,
// stdio.Stdin into stdin (closed when it ends; nil: none), sizes and
// signals to process execID, until wait returns.
func (s *Service) relay(ctx context.Context, b *Box, execID, path string, stdin io.WriteCloser, stdio api.Stdio, wait func(context.Context) (api.Exit, error)) (api.Exit, error) {
	wctx := context.WithoutCancel(ctx)
	done := make(chan struct{})
	var exit api.Exit
	var werr error
	go func() {
		defer close(done)
		exit, werr = wait(ctx)
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	if stdin != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if stdio.Stdin != nil {
				copyUntil(done, stdin, stdio.Stdin)
			}
			stdin.Close()
			b.CloseStdin(wctx, execID)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case sz, ok := <-stdio.Resize:
				if !ok {
					stdio.Resize = nil
					continue
				}
				b.ResizePty(wctx, execID, sz.Width, sz.Height)
			case sig, ok := <-stdio.Signals:
				if !ok {
					stdio.Signals = nil
					continue
				}
				if err := b.Kill(wctx, execID, sig, false); err != nil {
					log.G(ctx).WithError(err).Debug("forward signal")
				}
			case <-done:
				return
			}
		}
	}()
	rerr := readLog(ctx, path, time.Time{}, true, done, stdio.Stdout, stdio.Stderr)
	<-done
	if werr != nil {
		return api.Exit{}, werr
	}
	if rerr != nil && !errors.Is(rerr, context.Canceled) {
		return exit, fmt.Errorf("relaying output: %w", rerr)
	}
	return exit, nil
}

// copyUntil copies src to dst until src ends, a write fails or done closes.
func copyUntil(done <-chan struct{}, dst io.Writer, src io.Reader) {
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		io.Copy(dst, src)
	}()
	select {
	case <-ended:
	case <-done:
	}
}

// Exec runs another process in a running box and relays its stdio.
func (s *Service) Exec(ctx context.Context, ref string, req api.ExecRequest, stdio api.Stdio) (api.Exit, error) {
	if len(req.Cmd) == 0 {
		return api.Exit{}, errorf(errdefs.ErrInvalidArgument, "no command given")
	}
	b, err := s.get(ctx, ref)
	if err != nil {
		return api.Exit{}, err
	}
	defer b.Close()
	execID := "exec-" + NewID()
	st, err := boxStdio(b.Dir(), execID, req.Stdin, req.TTY)
	if err != nil {
		return api.Exit{}, err
	}
	defer removeStdio(st)
	var stdin io.WriteCloser
	if st.Stdin != "" {
		if stdin, err = openStdinWriter(ctx, st.Stdin); err != nil {
			return api.Exit{}, err
		}
		defer stdin.Close()
	}
	spec := ExecSpec{Args: req.Cmd, Env: req.Env, Cwd: req.Cwd, User: req.User, Terminal: req.TTY}
	if err := b.Exec(ctx, execID, spec, st); err != nil {
		return api.Exit{}, err
	}
	wctx := context.WithoutCancel(ctx)
	defer b.DeleteExec(wctx, execID)
	if _, err := b.Start(ctx, execID); err != nil {
		return api.Exit{}, err
	}
	return s.relay(ctx, b, execID, logPathOf(st.Stdout), stdin, stdio, func(ctx context.Context) (api.Exit, error) {
		e, err := b.Wait(wctx, execID)
		return api.Exit{Status: e.Status, At: e.At}, err
	})
}

// removeStdio removes an exec's log and FIFO.
func removeStdio(st Stdio) {
	if p := logPathOf(st.Stdout); p != "" {
		os.Remove(p)
	}
	if st.Stdin != "" {
		os.Remove(st.Stdin)
	}
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
