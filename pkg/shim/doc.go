// Package shim is containerd-shim-boxlite-v1: a containerd shim v2 serving
// Task API v3 over ttrpc, one long-lived process per box or per Kubernetes
// pod, built on containerd 2.4's shim library (RunShim, the Shim interface,
// the bootstrap protocol).
//
// A shim serves one sandbox: one microVM (pkg/sandbox: QEMU plus the guest
// agent) with its state directory, network, share, health checker and one
// exit loop, and the containers that run in it. A single-container box is
// its own sandbox. A pod's sandbox (pause) container boots the VM; the
// pod's app containers (io.kubernetes.cri.container-type=container) are
// served by the same shim and created in the running VM, joining the pause
// container's namespaces in the guest. Start, Exec, Kill, Wait, Delete and
// the rest are forwarded to the agent.
// Stdio comes from containerd as FIFOs, file:// or binary:// URIs and is
// relayed to the guest by offset (pkg/agent). Events go out in the order
// Create, Start, (OOM), Exit, Delete, and ExecAdded, ExecStarted, Exit.
//
// Every child of the shim is started through pkg/reaper, which owns wait(2);
// the library's own reaper is off (shim.Config.NoReaper). The VMM is killed
// through one path (its pidfd, then a bounded reap) from Kill, Delete,
// Shutdown and the delete action, and destructive cleanup (unmount, state
// removal) happens only after the VMM was reaped.
package shim
