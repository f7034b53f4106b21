// Package api holds the types of boxlite's REST API v1 (docs/api.yaml) and
// the Boxes interface that both the local manager and the REST client
// implement, so that the CLI runs every command through one interface in
// both modes. It depends on nothing heavier than errdefs: the client and
// programs using it do not link the manager.
package api

import (
	"strconv"
	"strings"
	"time"
)

// CreateRequest is the body of POST /v1/boxes. Unknown fields are refused.
type CreateRequest struct {
	// Image names an image to run; Rootfs is a root filesystem directory
	// on the daemon's host instead. Exactly one is required.
	Image  string `json:"image,omitempty"`
	Rootfs string `json:"rootfs,omitempty"`
	// Cmd is the command and its arguments.
	Cmd []string `json:"cmd,omitempty"`
	// Env holds K=V pairs.
	Env []string `json:"env,omitempty"`
	// Cwd is the working directory in the box (default /).
	Cwd string `json:"cwd,omitempty"`
	// User is UID[:GID] or a user name from the rootfs.
	User string `json:"user,omitempty"`
	// Memory limits the process's memory, in bytes (0: no limit).
	Memory uint64 `json:"memory,omitempty"`
	// CPUs sizes the VM and sets a CPU quota (0: default).
	CPUs float64 `json:"cpus,omitempty"`
	// Network is user (default), none or netns:PATH.
	Network string `json:"network,omitempty"`
	// Ports are published ports, each [IP:]HOSTPORT:BOXPORT[/tcp|udp].
	Ports []string `json:"ports,omitempty"`
	// Volumes are bind mounts, each HOSTPATH:BOXPATH[:ro|rw].
	Volumes []string `json:"volumes,omitempty"`
	// AutoRemove removes the box once its process exited.
	AutoRemove bool `json:"auto_remove,omitempty"`
	// Name is an optional unique name.
	Name string `json:"name,omitempty"`
	// Labels are free key/value pairs to filter boxes by.
	Labels map[string]string `json:"labels,omitempty"`
	// TTY gives the process a terminal; OpenStdin keeps a stdin the first
	// attach writes to.
	TTY       bool `json:"tty,omitempty"`
	OpenStdin bool `json:"open_stdin,omitempty"`
	// Privileged gives the process every capability, no seccomp filter,
	// every device of the guest and writable /proc and /sys, as docker
	// run --privileged does: inside the box's VM, not on the host.
	Privileged bool `json:"privileged,omitempty"`
	// HealthCheckDisabled is three-state: true turns health checks off;
	// false or absent keeps the default (on).
	HealthCheckDisabled *bool `json:"health_check_disabled,omitempty"`
	// HealthCheck tunes the checks; ignored when disabled (disabled wins).
	HealthCheck *HealthCheck `json:"health_check,omitempty"`
}

// HealthCheck tunes a box's health check. Empty fields keep the defaults
// (30s, 10s, 60s, 3). Durations are Go durations such as "30s".
type HealthCheck struct {
	Interval    string `json:"interval,omitempty"`
	Timeout     string `json:"timeout,omitempty"`
	StartPeriod string `json:"start_period,omitempty"`
	Retries     int    `json:"retries,omitempty"`
}

// CreateResponse answers POST /v1/boxes (201).
type CreateResponse struct {
	ID string `json:"id"`
}

// StopRequest is the body of POST /v1/boxes/{id}/stop: send Signal
// (default SIGTERM), wait Timeout (default 10s), then SIGKILL.
type StopRequest struct {
	Signal  string `json:"signal,omitempty"`
	Timeout string `json:"timeout,omitempty"`
}

// KillRequest is the body of POST /v1/boxes/{id}/kill.
type KillRequest struct {
	// Signal is a name (TERM, SIGKILL) or number; default SIGTERM.
	Signal string `json:"signal,omitempty"`
	// All signals every process in the box.
	All bool `json:"all,omitempty"`
}

// ExecRequest describes a process to run in a running box.
type ExecRequest struct {
	Cmd  []string `json:"cmd"`
	Env  []string `json:"env,omitempty"`
	Cwd  string   `json:"cwd,omitempty"`
	User string   `json:"user,omitempty"`
	TTY  bool     `json:"tty,omitempty"`
	// Stdin says the client sends stdin.
	Stdin bool `json:"stdin,omitempty"`
}

// ListFilter selects boxes: by status, and by labels (each K or K=V must
// match).
type ListFilter struct {
	Status []string
	Labels []string
}

// Match reports whether box b passes the filter.
func (f ListFilter) Match(b Box) bool {
	if len(f.Status) > 0 {
		ok := false
		for _, s := range f.Status {
			ok = ok || s == b.Status
		}
		if !ok {
			return false
		}
	}
	for _, l := range f.Labels {
		k, v, hasValue := strings.Cut(l, "=")
		got, ok := b.Labels[k]
		if !ok || hasValue && got != v {
			return false
		}
	}
	return true
}

// LogsOptions select a box's output: frames since a time, and following
// new output until the box's process exited.
type LogsOptions struct {
	Since  time.Time
	Follow bool
}

// Box is a box's record: GET /v1/boxes/{id}, and what boxlite inspect
// prints. The fields mirror the manager's record one for one.
type Box struct {
	ID            string            `json:"id"`
	Name          string            `json:"name,omitempty"`
	Image         string            `json:"image,omitempty"`
	Bundle        string            `json:"bundle"`
	Rootfs        string            `json:"rootfs"`
	Command       []string          `json:"command"`
	Terminal      bool              `json:"terminal,omitempty"`
	Stdin         string            `json:"stdin,omitempty"`
	Stdout        string            `json:"stdout,omitempty"`
	Stderr        string            `json:"stderr,omitempty"`
	ShimAddress   string            `json:"shim_address,omitempty"`
	ShimPid       int               `json:"shim_pid,omitempty"`
	ShimStartTime uint64            `json:"shim_start_time,omitempty"`
	VMMPid        int               `json:"vmm_pid,omitempty"`
	VMMStartTime  uint64            `json:"vmm_start_time,omitempty"`
	TaskPid       uint32            `json:"task_pid,omitempty"`
	Status        string            `json:"status"`
	ExitStatus    uint32            `json:"exit_status"`
	ExitedAt      time.Time         `json:"exited_at,omitzero"`
	OOMKilled     bool              `json:"oom_killed,omitempty"`
	Health        string            `json:"health,omitempty"`
	Network       string            `json:"network,omitempty"`
	Ports         []string          `json:"ports,omitempty"`
	Interfaces    []Interface       `json:"interfaces,omitempty"`
	Labels        map[string]string `json:"labels,omitempty"`
	AutoRemove    bool              `json:"auto_remove,omitempty"`
	CreatedAt     time.Time         `json:"created_at"`
	// CreatorPid and CreatorStartTime name the process creating the box,
	// until its create returned.
	CreatorPid       int    `json:"creator_pid,omitempty"`
	CreatorStartTime uint64 `json:"creator_start_time,omitempty"`
}

// Interface is one configured network interface of a box.
type Interface struct {
	Name      string   `json:"name"`
	MAC       string   `json:"mac"`
	Addresses []string `json:"addresses"`
}

// Exit is how a process ended: GET /v1/boxes/{id}/wait.
type Exit struct {
	// Status is the exit code (128+n for a signal n; 137 when the shim or
	// VMM died).
	Status uint32 `json:"exit_status"`
	// At is when it exited.
	At time.Time `json:"exited_at,omitzero"`
}

// Event is one event of a box, as boxlite events prints it and GET
// /v1/events streams it.
type Event struct {
	Time       time.Time `json:"time"`
	Topic      string    `json:"topic"`
	ID         string    `json:"id,omitempty"`
	ExecID     string    `json:"exec_id,omitempty"`
	Pid        uint32    `json:"pid,omitempty"`
	Exited     bool      `json:"exited,omitempty"`
	ExitStatus uint32    `json:"exit_status,omitempty"`
	Health     string    `json:"health,omitempty"`
}

// String formats the event as boxlite events prints it:
// TIME TOPIC ID [exec_id] [exit status] [health].
func (e Event) String() string {
	id := e.ID
	if id == "" {
		id = "-"
	}
	parts := []string{e.Time.UTC().Format(time.RFC3339Nano), e.Topic, id}
	if e.ExecID != "" {
		parts = append(parts, e.ExecID)
	}
	if e.Exited {
		parts = append(parts, strconv.FormatUint(uint64(e.ExitStatus), 10))
	}
	if e.Health != "" {
		parts = append(parts, e.Health)
	}
	return strings.Join(parts, " ")
}

// Image is an image in the daemon's store: GET /v1/images.
type Image struct {
	// Name is the normalised reference, e.g. docker.io/library/busybox:latest.
	Name string `json:"name"`
	// Digest is the digest of its manifest.
	Digest string `json:"digest"`
	// Size is the bytes of its content as fetched (compressed layers).
	Size int64 `json:"size"`
	// Created is when it was built, if its config says.
	Created time.Time `json:"created,omitzero"`
	// Config is what it runs unless told otherwise.
	Config ImageConfig `json:"config"`
	// Layers counts its layers.
	Layers int `json:"layers"`
}

// ImageConfig is the part of an image's config a box uses.
type ImageConfig struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// PullRequest is the body of POST /v1/images/pull.
type PullRequest struct {
	Ref string `json:"ref"`
}

// ParseSince reads a "since" of logs: an RFC 3339 time, Unix seconds, or a
// duration before now ("10m").
func ParseSince(v string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	if f, err := strconv.ParseFloat(v, 64); err == nil && f >= 0 {
		return time.Unix(0, int64(f*1e9)), nil
	}
	return time.Time{}, Errorf(CodeInvalidArgument, "since=%q: want an RFC 3339 time, Unix seconds or a duration such as 10m", v)
}
