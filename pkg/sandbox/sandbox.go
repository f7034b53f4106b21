// Package sandbox pairs one microVM with the client of the agent inside it:
// it boots the VM, waits (bounded) for the agent, and tears both down as one
// unit. A guest that never becomes ready, dies during boot, or breaks the
// agent protocol is stopped and reaped, and the error carries the last lines
// of its console.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// DefaultBootTimeout bounds the wait for the guest agent after launch.
const DefaultBootTimeout = 60 * time.Second

// exitAttributionGrace is how long a failed boot waits for the VM's exit to
// tell a dead guest from a broken one.
const exitAttributionGrace = 2 * time.Second

// consoleLines is how many console lines a boot error quotes.
const consoleLines = 15

// Config describes one sandbox.
type Config struct {
	// VM configures the microVM; its Share is the guest's ShareTag.
	VM vmm.Config
	// BootTimeout bounds launch to agent-ready (default DefaultBootTimeout).
	BootTimeout time.Duration
}

// ShareTag is the 9p mount tag under which the guest finds Config.VM.Share.
const ShareTag = vmm.ShareTag

// vm is what a sandbox needs from its VMM (a *vmm.QEMU; a fake in tests).
type vm interface {
	Start(ctx context.Context) error
	Done() <-chan struct{}
	Wait(ctx context.Context) (reaper.Exit, error)
	Stop(ctx context.Context) error
	Kill() error
	Identity() reaper.Identity
	OOMKilled() bool
	AgentSocket() string
	ConsoleTail(n int) []string
}

// Sandbox is a running microVM with a connected agent. It is the only door
// to the VM: callers ask it for the VMM's pid, whether the host's OOM killer
// took it, and to stop it; they never reach the VMM itself.
type Sandbox struct {
	vm    vm
	agent *agent.Client
	// shutdownGuest asks the guest to shut itself down (the agent's
	// Shutdown; replaced in tests).
	shutdownGuest func(ctx context.Context) error
	// Info is the agent's answer to the readiness ping.
	Info *api.PingResponse
	// BootTime is launch to agent-ready.
	BootTime time.Duration
	// guestMACs are the NICs' addresses as the guest finds them.
	guestMACs []net.HardwareAddr
	// restored is the key of the template the VM was restored from.
	restored string

	// stopMu serialises Stop; stopped says one succeeded. A failed Stop
	// is remembered by nobody: the next one tries again.
	stopMu  sync.Mutex
	stopped bool
}

// Start boots a VM and connects to its agent. On any failure the VM is
// killed and reaped before Start returns. ctx bounds the boot only.
func Start(ctx context.Context, cfg Config) (*Sandbox, error) {
	timeout := cfg.BootTimeout
	if timeout <= 0 {
		timeout = DefaultBootTimeout
	}
	if ts := cfg.VM.Templates; ts != nil && ts.Ready == nil {
		t := *ts
		// The template's readiness: a ping without entropy (every clone
		// would inherit a reseed).
		t.Ready = agent.Probe
		cfg.VM.Templates = &t
	}
	began := time.Now()
	s, err := start(ctx, cfg.VM, timeout)
	if err != nil && s != nil && s.restored != "" && ctx.Err() == nil {
		// A clone that did not come up is the template's fault, not the
		// box's: the box boots cold, and the next one builds the
		// template again.
		log.G(ctx).WithError(err).WithField("template", s.restored).Warn("VM restored from a template did not become ready: discarding the template, booting cold")
		s.vm.(*vmm.QEMU).DiscardTemplate()
		cold := cfg.VM
		cold.Templates = nil
		s, err = start(ctx, cold, timeout-time.Since(began))
	}
	if err != nil {
		return nil, err
	}
	go s.watch()
	return s, nil
}

// start boots one VM; on failure the sandbox it returns (if any) says
// whether it was a clone.
func start(ctx context.Context, cfg vmm.Config, timeout time.Duration) (*Sandbox, error) {
	q, err := vmm.NewQEMU(cfg)
	if err != nil {
		return nil, err
	}
	s := &Sandbox{vm: q}
	s.shutdownGuest = s.agentShutdown
	err = s.boot(ctx, timeout)
	s.restored = q.Template()
	s.guestMACs = q.GuestMACs()
	return s, err
}

// boot launches the VM and waits for its agent; it leaves nothing running
// when it fails.
func (s *Sandbox) boot(ctx context.Context, timeout time.Duration) error {
	began := time.Now()
	bctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := s.vm.Start(bctx); err != nil {
		return err
	}
	// A guest that dies during boot ends the wait at once.
	go func() {
		select {
		case <-s.vm.Done():
			cancel()
		case <-bctx.Done():
		}
	}()
	c, info, err := agent.Dial(bctx, s.vm.AgentSocket())
	if err == nil {
		s.agent, s.Info, s.BootTime = c, info, time.Since(began)
		return nil
	}
	// The agent socket closes as QEMU dies, a moment before the reaper
	// has collected it: unless the boot timed out, give the exit that
	// moment so the error says the VM died rather than "connection closed".
	died := false
	grace := time.NewTimer(exitAttributionGrace)
	if bctx.Err() != nil {
		grace.Reset(0)
	}
	select {
	case <-s.vm.Done():
		died = true
	case <-grace.C:
	}
	grace.Stop()
	if kerr := s.vm.Kill(); kerr != nil {
		err = errors.Join(err, kerr)
	}
	switch {
	case errors.Is(err, agent.ErrProtocol):
		err = fmt.Errorf("guest broke the agent protocol during boot, VM stopped: %w", err)
	case died:
		e, _ := s.vm.Wait(context.Background())
		err = fmt.Errorf("VM exited during boot (%v) before its agent was ready: %w", e, err)
	case ctx.Err() == nil:
		err = fmt.Errorf("guest agent not ready within %v, VM stopped: %w", timeout, err)
	}
	return fmt.Errorf("%w%s", err, s.consoleSuffix())
}

func (s *Sandbox) consoleSuffix() string {
	lines := s.vm.ConsoleTail(consoleLines)
	if len(lines) == 0 {
		return "\n(no console output)"
	}
	return "\nlast console lines:\n  " + strings.Join(lines, "\n  ")
}

// watch stops the VM when the guest breaks the protocol: the guest is not
// trusted, and a broken connection cannot be resynchronised.
func (s *Sandbox) watch() {
	select {
	case <-s.agent.Done():
	case <-s.vm.Done():
		return
	}
	if err := s.agent.Err(); err != nil {
		log.L.WithError(err).Warn("guest broke the agent protocol: stopping the VM")
		_ = s.vm.Kill()
	}
}

// Agent returns the client of the guest agent.
func (s *Sandbox) Agent() *agent.Client { return s.agent }

// ConsoleTail returns up to the last n lines of the guest's console.
func (s *Sandbox) ConsoleTail(n int) []string { return s.vm.ConsoleTail(n) }

// Identity is the VMM's pid and start time.
func (s *Sandbox) Identity() reaper.Identity { return s.vm.Identity() }

// Pid is the VMM's pid: the "pid" of every task in the sandbox, as with Kata.
func (s *Sandbox) Pid() uint32 { return uint32(s.vm.Identity().Pid) }

// OOMKilled reports, once Done is closed, whether the host's OOM killer
// killed the VMM.
func (s *Sandbox) OOMKilled() bool { return s.vm.OOMKilled() }

// Done is closed when the VM has exited and been reaped.
func (s *Sandbox) Done() <-chan struct{} { return s.vm.Done() }

// Wait blocks until the VM has exited and been reaped, or ctx is done.
func (s *Sandbox) Wait(ctx context.Context) (reaper.Exit, error) { return s.vm.Wait(ctx) }

// agentShutdown asks the agent to sync and reboot the guest.
func (s *Sandbox) agentShutdown(ctx context.Context) error {
	if s.agent == nil {
		return errors.New("no agent connection")
	}
	_, err := s.agent.Shutdown(ctx, &api.Empty{})
	return err
}

// Stop shuts the VM down and returns once the VMM is reaped: it asks the
// guest to shut down and waits up to half of the time left for the VMM to
// exit, then stops the VMM (QMP quit, SIGKILL at ctx's deadline). A Stop
// that succeeded makes later ones return nil at once; a failed one (the
// VMM could not be reaped) can be retried.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	if s.stopped {
		return nil
	}
	s.askGuestToStop(ctx)
	if err := s.vm.Stop(ctx); err != nil {
		return err
	}
	s.stopped = true
	s.closeAgent()
	return nil
}

// askGuestToStop asks the guest to shut down and waits, for up to half of
// ctx's remaining time, for the VMM to exit.
func (s *Sandbox) askGuestToStop(ctx context.Context) {
	select {
	case <-s.vm.Done():
		return
	default:
	}
	gctx, cancel := halfOf(ctx)
	defer cancel()
	if err := s.shutdownGuest(gctx); err != nil {
		log.G(ctx).WithError(err).WithField("pid", s.vm.Identity().Pid).Debug("guest shutdown failed")
		return
	}
	select {
	case <-s.vm.Done():
	case <-gctx.Done():
	}
}

// halfOf returns a context ending halfway to ctx's deadline
// (defaultStopTimeout/2 from now without one).
func halfOf(ctx context.Context) (context.Context, context.CancelFunc) {
	left := defaultStopTimeout
	if dl, ok := ctx.Deadline(); ok {
		left = time.Until(dl)
	}
	return context.WithTimeout(ctx, left/2)
}

// defaultStopTimeout bounds a Stop whose ctx has no deadline.
const defaultStopTimeout = vmm.DefaultStopTimeout

// Kill SIGKILLs the VMM and reaps it: the canonical kill path.
func (s *Sandbox) Kill() error {
	err := s.vm.Kill()
	s.closeAgent()
	return err
}

func (s *Sandbox) closeAgent() {
	if s.agent != nil {
		_ = s.agent.Close()
	}
}

// Template is the key of the VM template the VM was restored from, "" when
// it booted cold.
func (s *Sandbox) Template() string { return s.restored }

// GuestMACs are the NICs' addresses as the guest finds them: a clone has
// its template's until its agent sets the box's own.
func (s *Sandbox) GuestMACs() []net.HardwareAddr { return s.guestMACs }
