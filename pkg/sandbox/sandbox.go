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
	// VM configures the microVM. GuestShutdown is set by the sandbox.
	VM vmm.Config
	// BootTimeout bounds launch to agent-ready (default DefaultBootTimeout).
	BootTimeout time.Duration
}

// vm is what a sandbox needs from its VMM.
type vm interface {
	Start(ctx context.Context) error
	Done() <-chan struct{}
	Wait(ctx context.Context) (reaper.Exit, error)
	Stop(ctx context.Context) error
	Kill() error
	AgentSocket() string
	ConsoleTail(n int) []string
}

// Sandbox is a running microVM with a connected agent.
type Sandbox struct {
	vm    vm
	qemu  *vmm.QEMU
	agent *agent.Client
	// Info is the agent's answer to the readiness ping.
	Info *api.PingResponse
	// BootTime is launch to agent-ready.
	BootTime time.Duration

	stopOnce sync.Once
	stopErr  error
}

// Start boots a VM and connects to its agent. On any failure the VM is
// killed and reaped before Start returns. ctx bounds the boot only.
func Start(ctx context.Context, cfg Config) (*Sandbox, error) {
	s := &Sandbox{}
	cfg.VM.GuestShutdown = s.shutdownGuest
	q, err := vmm.NewQEMU(cfg.VM)
	if err != nil {
		return nil, err
	}
	s.vm, s.qemu = q, q
	timeout := cfg.BootTimeout
	if timeout <= 0 {
		timeout = DefaultBootTimeout
	}
	if err := s.boot(ctx, timeout); err != nil {
		return nil, err
	}
	go s.watch()
	return s, nil
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

// VM returns the VMM handle (pid, start time, console).
func (s *Sandbox) VM() *vmm.QEMU { return s.qemu }

// Done is closed when the VM has exited and been reaped.
func (s *Sandbox) Done() <-chan struct{} { return s.vm.Done() }

// shutdownGuest is the VMM's graceful stop hook: ask the agent to sync and
// reboot the guest.
func (s *Sandbox) shutdownGuest(ctx context.Context) error {
	if s.agent == nil {
		return errors.New("no agent connection")
	}
	_, err := s.agent.Shutdown(ctx, &api.Empty{})
	return err
}

// Stop shuts the guest down gracefully (agent, then QMP quit), SIGKILLs it at
// ctx's deadline, and returns once the VMM is reaped. It is idempotent.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.stopOnce.Do(func() {
		s.stopErr = s.vm.Stop(ctx)
		if s.agent != nil {
			_ = s.agent.Close()
		}
	})
	return s.stopErr
}

// Kill SIGKILLs the VMM and reaps it: the canonical kill path.
func (s *Sandbox) Kill() error {
	err := s.vm.Kill()
	if s.agent != nil {
		_ = s.agent.Close()
	}
	return err
}
