// Package vmm launches and owns the virtual machine monitor that runs one box.
//
// VM is the narrow interface the shim consumes; QEMU is its only backend: a
// QEMU microvm child process started through the process-wide reaper, with
// its own process group and Pdeathsig SIGKILL so it never outlives the shim,
// a pid file (pid and start time) in the state directory so a later
// "delete" can find it without hitting a reused pid, a QMP control socket, a
// virtio-serial agent socket, and a bounded console log.
//
// The context passed to Start bounds the launch only, never the VM's life.
package vmm

import (
	"context"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// VM is one virtual machine and its monitor process.
//
// Every method is safe to call concurrently. Stop and Kill are idempotent and
// may race with Wait; once Done is closed the monitor has been reaped and its
// pid file removed.
type VM interface {
	// Start launches the monitor and returns once it is ready to be
	// controlled. ctx bounds the launch only, never the VM's life. A VM can
	// be started once.
	Start(ctx context.Context) error
	// Wait blocks until the monitor has exited and been reaped, or ctx is
	// done, and returns its exit. Many callers may wait at once.
	Wait(ctx context.Context) (reaper.Exit, error)
	// Done is closed once the monitor has exited and been reaped (or Start
	// failed, or the VM was stopped before it started).
	Done() <-chan struct{}
	// Stop shuts the VM down gracefully, escalating to SIGKILL at ctx's
	// deadline, and returns once the monitor is reaped. It returns an error
	// naming the live pid if the monitor could not be reaped.
	Stop(ctx context.Context) error
	// Kill sends SIGKILL to the monitor and waits a bounded time for it to
	// be reaped.
	Kill() error
	// OOMKilled reports, once Done is closed, whether the host's OOM
	// killer killed the monitor.
	OOMKilled() bool
	// AgentSocket is the host unix socket connected to the guest agent's
	// port.
	AgentSocket() string
	// ConsoleTail returns up to the last n lines the guest and the monitor
	// wrote to the console, oldest first.
	ConsoleTail(n int) []string
}

var _ VM = (*QEMU)(nil)
