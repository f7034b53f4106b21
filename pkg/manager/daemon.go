package manager

import (
	"context"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

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

// rewatch watches box id's shim again after a teardown that failed (one
// that could not be reaped is still there).
func (s *Service) rewatch(id string) {
	if r, err := s.m.store.Get(id); err == nil {
		s.watchShim(*r)
	}
}
