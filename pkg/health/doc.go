// Package health checks that a box is alive and answering: a Checker runs a
// Probe (in the shim: the VMM is running and the guest agent answers a ping)
// every Interval, moves the box between Starting, Healthy and Unhealthy, and
// reports each change, which the shim publishes on Topic as an
// api.TaskHealth event.
//
// Checks are on by default (DefaultOptions) and tuned or disabled per box
// with the io.boxlite.health.* annotations. A checker only observes: it
// never kills or tears down a box, so exits are reaped and reported the same
// with checks disabled.
package health
