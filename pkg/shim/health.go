package shim

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/health"
	healthapi "github.com/boxlite/boxlite/pkg/health/api"
)

// errVMMExited is the probe's failure once the VMM is gone.
var errVMMExited = errors.New("vmm exited")

// startHealth starts the sandbox's health checker once its own container's
// init is running. It only observes and publishes: exits, reaping and
// teardown never depend on it, and stopHealth (at that init's exit, the
// VM's death or teardown) ends its goroutine so it never keeps the shim
// alive.
func (b *sandbox) startHealth(pub *publisher) {
	if b.healthOpts.Disabled {
		log.L.WithField("id", b.id).Debug("health check disabled")
		b.writeHealth(health.State{Status: health.Disabled, At: time.Now()})
		return
	}
	b.writeHealth(health.State{Status: health.Starting, At: time.Now()})
	ctx, cancel := context.WithCancel(context.Background())
	b.mu.Lock()
	if b.stopHealthFn != nil {
		b.mu.Unlock()
		cancel()
		return
	}
	b.stopHealthFn = cancel
	b.mu.Unlock()
	c := health.NewChecker(b.healthOpts, time.Now(), b.probe, func(st health.State) {
		l := log.L.WithField("id", b.id).WithField("health", st.Status)
		if st.Status == health.Unhealthy {
			// A guest that stopped answering is reported, not killed.
			l.WithField("error", st.LastError).Warn("box is unhealthy")
		} else {
			l.Info("box health changed")
		}
		// Under mu, so nothing is sent once stopHealth returned: health
		// events never follow the init's TaskExit.
		b.mu.Lock()
		defer b.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		b.writeHealth(st)
		pub.send(&healthapi.TaskHealth{
			ContainerId: b.id, Status: string(st.Status), FailingStreak: uint32(st.FailingStreak),
			LastError: st.LastError, At: timestamppb.New(st.At),
		})
	})
	go c.Run(ctx)
}

// stopHealth ends the sandbox's health checker, if it runs. Later calls do
// nothing, and startHealth after it does not start one.
func (b *sandbox) stopHealth() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopHealthFn != nil {
		b.stopHealthFn()
	}
	b.stopHealthFn = func() {}
}

// probe checks that the VMM runs and the guest agent answers a ping.
func (b *sandbox) probe(ctx context.Context) error {
	select {
	case <-b.vm.Done():
		return errVMMExited
	default:
	}
	_, err := b.vm.Agent().Ping(ctx, &api.PingRequest{})
	return err
}

// writeHealth replaces the bundle's health file. A failure is logged: the
// events carry the same news.
func (b *sandbox) writeHealth(st health.State) {
	if err := health.WriteFile(b.bundle, st); err != nil {
		log.L.WithError(err).WithField("id", b.id).Warn("write health file")
	}
}
