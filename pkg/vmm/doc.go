// Package vmm launches and owns the virtual machine monitor that runs one box
// or pod.
//
// QEMU is the only backend: a QEMU microvm child process started through the
// process-wide reaper, with its own process group and Pdeathsig SIGKILL so it
// never outlives the shim, a pid file (pid and start time) in the state
// directory so a later "delete" can find it without hitting a reused pid, a
// QMP control socket, a virtio-serial agent socket, and a bounded console
// log. Every method of QEMU is safe to call concurrently; Stop and Kill are
// idempotent and may race with Wait; once Done is closed the monitor has
// been reaped and its pid file removed.
//
// The package knows nothing of the guest's protocol: pkg/sandbox pairs a
// QEMU with the agent inside it and consumes it through a small interface of
// its own (the seam its tests use).
//
// The context passed to Start bounds the launch only, never the VM's life.
package vmm
