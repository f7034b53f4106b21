// Package manager is boxlite's thin manager: a mini-containerd that drives
// containerd-shim-boxlite-v1 without containerd.
//
// It keeps one state directory with one record per box (Store), writes each
// box's OCI bundle, bootstraps the shim binary with the same arguments,
// environment and stdin protobuf that containerd 2.4 uses, talks Task API v3
// to it over ttrpc, and serves the events ttrpc service the shim publishes to
// (EventServer). Every manager invocation is a fresh process, so recovery is
// reading records: a record whose shim is alive is reconnected, one whose
// shim or VMM is dead (or whose pid was reused) is marked stopped with exit
// 137 and its stale files removed, with the shim's delete action run to clean
// up the VM. A record whose creator died before its Create returned is
// recovered: created if the shim made the task, else undone (interrupted.go).
//
// Every child process is started through pkg/reaper; the manager process is
// a child subreaper, so the daemonized shims it bootstraps reparent to it and
// are reaped by the reaper's single SIGCHLD loop.
package manager
