package api

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Boxes is every operation on boxes, as the CLI uses them. The local
// manager (manager.Service) and the REST client (pkg/client) implement it,
// and the daemon serves a manager.Service over REST: each operation has one
// implementation, the manager's.
type Boxes interface {
	// Create makes a box (its VM boots) without starting its process and
	// returns its id.
	Create(ctx context.Context, req CreateRequest) (string, error)
	// Start starts a created box's process.
	Start(ctx context.Context, ref string) error
	// Stop sends a signal, waits up to a timeout for the process to exit,
	// SIGKILLs it if it did not, and stops the box's VM and shim, keeping
	// its record.
	Stop(ctx context.Context, ref string, req StopRequest) error
	// Kill sends a signal to the box's process (or all its processes).
	Kill(ctx context.Context, ref string, req KillRequest) error
	// Remove removes a stopped box, or with force kills a running one
	// first, through the one kill path, and removes its files only once
	// its shim was reaped.
	Remove(ctx context.Context, ref string, force bool) error
	// List returns the boxes that pass the filter, oldest first.
	List(ctx context.Context, f ListFilter) ([]Box, error)
	// Inspect returns one box's record.
	Inspect(ctx context.Context, ref string) (Box, error)
	// Wait blocks until the box's process exited and returns its exit.
	Wait(ctx context.Context, ref string) (Exit, error)
	// Logs writes the box's output to stdout and stderr.
	Logs(ctx context.Context, ref string, o LogsOptions, stdout, stderr io.Writer) error
	// Attach relays the box's output from its start, stdin (if the box
	// has one), terminal sizes and signals until its process exits, and
	// returns its exit.
	Attach(ctx context.Context, ref string, stdio Stdio) (Exit, error)
	// Exec runs another process in a running box with stdio relayed and
	// returns its exit.
	Exec(ctx context.Context, ref string, req ExecRequest, stdio Stdio) (Exit, error)
	// Events calls fn for each event of every box until ctx ends.
	Events(ctx context.Context, fn func(Event)) error
	// Images are the images boxes run.
	Images
	// Close releases what the implementation holds.
	Close() error
}

// Images is what can be done to the images boxes run.
type Images interface {
	// PullImage fetches an image by reference (docker.io/library/busybox
	// for "busybox"; plain HTTP only for loopback registries).
	PullImage(ctx context.Context, ref string) (Image, error)
	// LoadImages imports an OCI image layout or docker-save tarball.
	LoadImages(ctx context.Context, r io.Reader) ([]Image, error)
	// ListImages lists the images, by name.
	ListImages(ctx context.Context) ([]Image, error)
	// RemoveImage removes an image; one a box uses is refused.
	RemoveImage(ctx context.Context, ref string) error
}

// Stdio is the caller's side of a process's stdio during Attach or Exec.
type Stdio struct {
	// Stdin is relayed to the process when it has a stdin; nil for none.
	Stdin io.Reader
	// Stdout and Stderr receive its output (nil: discarded).
	Stdout, Stderr io.Writer
	// Resize carries terminal sizes; Signals signals to forward.
	Resize  <-chan Size
	Signals <-chan syscall.Signal
}

// Size is a terminal size.
type Size struct {
	Width  uint32 `json:"width"`
	Height uint32 `json:"height"`
}

// ParseSignal accepts a signal name (TERM, SIGTERM, term) or number; ""
// is def.
func ParseSignal(s string, def syscall.Signal) (syscall.Signal, error) {
	if s == "" {
		return def, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, Errorf(CodeInvalidArgument, "invalid signal %q", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, Errorf(CodeInvalidArgument, "invalid signal %q", s)
	}
	return sig, nil
}

// Errorf returns an *Error with code and a formatted message.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}
