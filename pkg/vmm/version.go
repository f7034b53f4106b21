package vmm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// versionTimeout bounds QEMUVersion when its ctx has no deadline.
const versionTimeout = 10 * time.Second

// QEMUVersion runs "binary --version" through the reaper and returns the
// first line it prints.
func QEMUVersion(ctx context.Context, binary string) (string, error) {
	ctx, cancel := withDefaultDeadline(ctx, versionTimeout)
	defer cancel()
	r, w, err := os.Pipe()
	if err != nil {
		return "", err
	}
	defer r.Close()
	cmd := exec.Command(binary, "--version")
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	proc, err := reaper.Default().Start(cmd)
	w.Close()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", binary, err)
	}
	out, readErr := readBounded(ctx, r, 64<<10)
	exit, err := waitOrKill(ctx, proc)
	if err == nil {
		err = readErr
	}
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", binary, err)
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if exit.Status != 0 {
		return "", fmt.Errorf("%s --version: %v: %s", binary, exit, first)
	}
	return strings.TrimSpace(first), nil
}

// readBounded reads r to EOF, at most max bytes, bounded by ctx.
func readBounded(ctx context.Context, r *os.File, max int64) ([]byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = r.SetReadDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = r.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	out, err := io.ReadAll(bufio.NewReader(io.LimitReader(r, max)))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = context.DeadlineExceeded
	}
	return out, err
}

// waitOrKill waits for proc until ctx is done, then kills it and waits a
// bounded time for the reaper. The error is ctx's when it had to kill.
func waitOrKill(ctx context.Context, proc *reaper.Process) (reaper.Exit, error) {
	exit, err := proc.Wait(ctx)
	if err == nil {
		return exit, nil
	}
	_ = proc.Signal(syscall.SIGKILL)
	kctx, cancel := context.WithTimeout(context.Background(), killReapTimeout)
	defer cancel()
	if _, kerr := proc.Wait(kctx); kerr != nil {
		return reaper.Exit{}, fmt.Errorf("%w; pid %d not reaped %v after SIGKILL", err, proc.Pid(), killReapTimeout)
	}
	return reaper.Exit{}, err
}

// CheckSandbox starts binary with the seccomp filter every VM gets
// (SeccompSandbox) and no machine, and has it quit over QMP on stdin: an
// error says the filter cannot be applied here (a QEMU built without
// seccomp, or a kernel without it), so no VM could start.
func CheckSandbox(ctx context.Context, binary string) error {
	ctx, cancel := withDefaultDeadline(ctx, versionTimeout)
	defer cancel()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	cmd := exec.Command(binary, "-sandbox", SeccompSandbox, "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio")
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	proc, err := reaper.Default().Start(cmd)
	w.Close()
	if err != nil {
		return fmt.Errorf("%s -sandbox: %w", binary, err)
	}
	out, readErr := readBounded(ctx, r, 64<<10)
	exit, err := waitOrKill(ctx, proc)
	if err == nil {
		err = readErr
	}
	if err != nil {
		return fmt.Errorf("%s -sandbox %s: %w", binary, SeccompSandbox, err)
	}
	if exit.Status != 0 || exit.Signal != 0 {
		return fmt.Errorf("%s -sandbox %s: %v: %s", binary, SeccompSandbox, exit, strings.TrimSpace(string(out)))
	}
	return nil
}
