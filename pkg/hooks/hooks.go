// Package hooks runs OCI runtime-spec hooks (specs.Hook) on the host, as
// runc does.
//
// Each hook is executed at its Path with exactly its Args as argv (Args[0]
// is argv[0] and may differ from Path; empty Args means argv is [Path]) and
// exactly its Env as the environment (empty Env means an empty environment;
// a duplicated key keeps its last value, as os/exec and runc do). The hook
// reads the container's state, the JSON of specs.State, on its stdin; a
// hook that does not read it is fine. The last 4 KiB of its stdout and of
// its stderr are kept for the error message. Hooks run in the caller's
// working directory, as under runc.
//
// Every hook is started through reaper.Default().Start and waited through
// the returned Process: nothing here calls exec.Cmd.Wait. A hook leads its
// own process group. When its Timeout (seconds) expires, or the caller's
// ctx is done, the group is sent SIGKILL, so a hook script's children die
// with it, and the hook is reaped before Run returns, within a bound: no
// hook is left running or a zombie.
//
// Run is for the hooks whose failure fails the operation (prestart,
// createRuntime, createContainer, startContainer); RunAll is for poststart
// and poststop, whose failures the spec makes warnings.
//
// Errors: a bad hook definition is errdefs.ErrInvalidArgument and no hook
// runs; a hook that cannot be started, exits non-zero, is killed by a
// signal or times out is errdefs.ErrFailedPrecondition (errors.Is also sees
// the start error, such as fs.ErrNotExist); a hook killed because ctx was
// done wraps ctx.Err(). Every message names the hook kind, the hook's
// index and path, how it ended and what it wrote to stderr (or to stdout
// when stderr is empty).
package hooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/errclass"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// Bounds of one hook run.
const (
	// outputLimit is how many bytes of each of a hook's stdout and stderr
	// are kept: the last ones written.
	outputLimit = 4 << 10
	// ioWaitDelay bounds how long a hook's stdio is still copied after the
	// hook exited: a descendant it left running may hold the pipes open
	// forever. Past it the pipes are closed and the rest is lost.
	ioWaitDelay = time.Second
	// killWait bounds the wait for a hook's exit after SIGKILL. Only a
	// process stuck in uninterruptible sleep outlives it; Run then returns
	// an error naming its pid, and the reaper collects it when it dies.
	killWait = 10 * time.Second
	// maxTimeout is the largest Timeout, in seconds, that a time.Duration
	// holds; a larger one never expires.
	maxTimeout = math.MaxInt64 / int64(time.Second)
)

// Run runs hooks in order and stops at the first failure, which it
// returns; the hooks after it do not run. kind is the spec's name for the
// hooks ("createRuntime"), used in errors. state is marshalled once and fed
// to every hook's stdin. The whole list is validated (see Validate) before
// any hook runs. If ctx is done, the running hook is killed and reaped and
// no further hook starts.
func Run(ctx context.Context, kind string, hooks []specs.Hook, state *specs.State) error {
	stdin, err := prepare(kind, hooks, state)
	if err != nil {
		return err
	}
	for i, h := range hooks {
		if err := run(ctx, kind, i, h, stdin); err != nil {
			return err
		}
	}
	return nil
}

// RunAll runs every hook in order, whether or not the ones before it
// failed, and returns one error per failed hook, in order (nil if all
// succeeded), for the caller to log as warnings. It is for poststart and
// poststop hooks. A list that fails Validate runs no hook and yields that
// one error. Once ctx is done, the running hook is killed and each later
// hook yields a "not started" error.
func RunAll(ctx context.Context, kind string, hooks []specs.Hook, state *specs.State) []error {
	stdin, err := prepare(kind, hooks, state)
	if err != nil {
		return []error{err}
	}
	var errs []error
	for i, h := range hooks {
		if err := run(ctx, kind, i, h, stdin); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// Validate checks hook definitions against the spec without running
// anything: each Path is absolute, each Timeout, if set, is greater than
// zero, and no Path, argument or environment entry holds a NUL byte. It
// reports every bad hook; the error is errdefs.ErrInvalidArgument. A shim
// can call it at create time so that a bad poststop hook is refused before
// anything started.
func Validate(kind string, hooks []specs.Hook) error {
	var errs []error
	for i, h := range hooks {
		if why := invalid(h); why != "" {
			errs = append(errs, classify(errdefs.ErrInvalidArgument, "%s: %s", name(kind, i, h), why))
		}
	}
	return errors.Join(errs...)
}

// invalid says what is wrong with h, or "" if nothing is.
func invalid(h specs.Hook) string {
	switch {
	case h.Path == "":
		return "path is empty"
	case !filepath.IsAbs(h.Path):
		return "path is not absolute"
	case h.Timeout != nil && *h.Timeout <= 0:
		return fmt.Sprintf("timeout %d must be greater than zero", *h.Timeout)
	case strings.ContainsRune(h.Path, 0):
		return "path holds a NUL byte"
	}
	for _, list := range [][]string{h.Args, h.Env} {
		for _, s := range list {
			if strings.ContainsRune(s, 0) {
				return fmt.Sprintf("%q holds a NUL byte", s)
			}
		}
	}
	return ""
}

// prepare validates the hooks and the state and returns the state's JSON.
func prepare(kind string, hooks []specs.Hook, state *specs.State) ([]byte, error) {
	if err := Validate(kind, hooks); err != nil {
		return nil, err
	}
	if state == nil {
		return nil, classify(errdefs.ErrInvalidArgument, "%s hooks: no container state", kind)
	}
	stdin, err := json.Marshal(state)
	if err != nil {
		return nil, classify(errdefs.ErrInvalidArgument, "%s hooks: marshal container state: %w", kind, err)
	}
	return stdin, nil
}

// name identifies hook i of kind in errors: `createRuntime hook #1 "/x"`.
func name(kind string, i int, h specs.Hook) string {
	return fmt.Sprintf("%s hook #%d %q", kind, i, h.Path)
}

// command builds the exec.Cmd of h: argv and environment exactly as
// given, stdout and stderr kept in out and errOut.
func command(h specs.Hook, stdin []byte, out, errOut *tail) *exec.Cmd {
	args := h.Args
	if len(args) == 0 {
		args = []string{h.Path}
	}
	// A nil Env would inherit ours; the spec's empty env is empty.
	env := h.Env
	if env == nil {
		env = []string{}
	}
	return &exec.Cmd{
		Path:        h.Path,
		Args:        args,
		Env:         env,
		Stdin:       bytes.NewReader(stdin),
		Stdout:      out,
		Stderr:      errOut,
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true},
		WaitDelay:   ioWaitDelay,
	}
}

// run runs hook i and returns how it failed, or nil.
func run(ctx context.Context, kind string, i int, h specs.Hook, stdin []byte) error {
	who := name(kind, i, h)
	if err := ctx.Err(); err != nil {
		return classify(err, "%s: not started: %v", who, err)
	}
	out, errOut := newTail(outputLimit), newTail(outputLimit)
	p, err := reaper.Default().Start(command(h, stdin, out, errOut))
	if err != nil {
		return classify(errdefs.ErrFailedPrecondition, "%s: cannot start: %w", who, err)
	}
	exit, killed := supervise(ctx, p, h.Timeout)
	output := errOut.describe("stderr")
	if output == "" {
		output = out.describe("stdout")
	}
	if output != "" {
		output = ": " + output
	}
	switch {
	case killed != nil:
		return classify(killed, "%s: %v%s", who, killed, output)
	case exit.Signal != 0:
		return classify(errdefs.ErrFailedPrecondition, "%s: killed by signal %s%s", who, unix.SignalName(exit.Signal), output)
	case exit.Status != 0:
		return classify(errdefs.ErrFailedPrecondition, "%s: exited with status %d%s", who, exit.Status, output)
	}
	return nil
}

// supervise waits until the hook p exits, or kills it when its timeout (in
// seconds, nil for none) expires or ctx is done, and then waits, bounded by
// killWait, for it to be reaped. killed says why it was killed, and whether
// it outlived the bound; it is nil if the hook ended on its own.
func supervise(ctx context.Context, p *reaper.Process, timeout *int) (exit reaper.Exit, killed error) {
	var expired <-chan time.Time
	if timeout != nil && int64(*timeout) <= maxTimeout {
		t := time.NewTimer(time.Duration(*timeout) * time.Second)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-p.Done():
	case <-expired:
		killed = classify(errdefs.ErrFailedPrecondition, "timed out after %ds", *timeout)
	case <-ctx.Done():
		killed = classify(ctx.Err(), "killed: %v", ctx.Err())
	}
	wait := context.Background()
	if killed != nil {
		select {
		case <-p.Done():
			killed = nil // it exited on its own meanwhile: report that
		default:
			kill(p)
			var cancel context.CancelFunc
			wait, cancel = context.WithTimeout(wait, killWait)
			defer cancel()
		}
	}
	exit, err := p.Wait(wait)
	if err != nil {
		return exit, classify(killed, "%v, and pid %d is still running %v after SIGKILL", killed, p.Pid(), killWait)
	}
	return exit, killed
}

// kill sends SIGKILL to the hook's process group, which it leads (Setpgid),
// so that the descendants that stayed in the group die with it, and to the
// hook itself through its pidfd. The group id is the hook's pid, which the
// kernel does not reuse while the hook or any member of its group is left;
// the caller has just seen the hook unreaped, so the only window for reuse
// is the instant between that check and the kill. An empty group makes the
// group kill find nothing (ESRCH).
func kill(p *reaper.Process) {
	_ = unix.Kill(-p.Pid(), unix.SIGKILL)
	_ = p.Signal(unix.SIGKILL)
}

// classify formats an error of class; a %w in format wraps a cause.
func classify(class error, format string, args ...any) error {
	return errclass.Errorf(class, format, args...)
}
