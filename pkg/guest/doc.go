// Package guest is boxlite-agent, PID 1 of a boxlite microVM.
//
// It prepares the initramfs as a root the OCI runtime can pivot_root away
// from, mounts the kernel filesystems, finds the virtio-serial port named
// "agent" and serves the agent API (pkg/agent/api) over ttrpc on it. Each
// container is run by a runc-compatible runtime (crun by default) driven by
// go-runc; the project reaper (pkg/reaper) is the only owner of wait(2) in the
// guest, for the runtime's own processes and for every orphan.
//
// Stdio is buffered in the guest and pulled by offset, so the host can retry a
// call without losing or duplicating bytes; exits and OOM kills are recorded
// and published as numbered events in a bounded ring.
//
// The package is Linux-only: it runs as the init of a Linux guest.
package guest
