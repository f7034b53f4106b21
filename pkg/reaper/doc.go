// Package reaper is the one owner of wait(2) in a boxlite process.
//
// A process that starts children (the shim on the host, the agent as PID 1 in
// the guest) marks itself a child subreaper and runs exactly one SIGCHLD loop,
// which is the only caller of wait4 in the process. Every child is started
// through Start, which registers it before it can exit; processes that are
// reparented to us (a runtime's container init, orphaned grandchildren) are
// reaped too, and their exits are kept for a bounded time so Claim can hand
// them to whoever learns their pid later. An exit is stored until claimed and
// is never dropped, however slow the consumer. Watch tells a long-lived
// daemon when each of many processes exits, ours or not, without taking
// their exits and without a thread per process.
//
// Nobody calls exec.Cmd.Wait or os.Process.Wait: they would race the loop and
// steal exit statuses (LESSONS.md #3).
package reaper
