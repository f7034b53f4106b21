package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// KillStale kills the monitor recorded in stateDir's pid file when this
// process does not hold a handle on it (after a shim restart, in the shim's
// delete action, or from the manager). The pid file's start time guards
// against a reused pid; the signal goes through a pidfd, so the process
// checked is the one signalled. It returns once the monitor is verified dead
// (reaped by us, or gone and not ours) and then removes the pid file and
// sockets; if the monitor is still alive at ctx's deadline it returns an
// error naming its pid and removes nothing. A missing pid file or a dead or
// reused pid is not an error: the identity found (if any) is returned.
func KillStale(ctx context.Context, stateDir string) (reaper.Identity, error) {
	pidPath := filepath.Join(stateDir, PidFileName)
	id, err := reaper.ReadPidFile(pidPath)
	if errdefs.IsNotFound(err) {
		return reaper.Identity{}, nil
	}
	if err != nil {
		// A torn pid file cannot name a process: nothing to kill.
		removeStateFiles(stateDir)
		return reaper.Identity{}, nil
	}
	exists, err := id.Exists()
	if err != nil {
		return id, err
	}
	if exists {
		if err := killIdentity(id); err != nil {
			return id, err
		}
		deadline, ok := ctx.Deadline()
		if !ok {
			deadline = time.Now().Add(DefaultStopTimeout)
		}
		outcome, _, err := reaper.Default().Reap(id.Pid, deadline)
		if err != nil {
			return id, err
		}
		if outcome == reaper.TimedOut {
			return id, fmt.Errorf("vmm pid %d still alive after SIGKILL: %w", id.Pid, errdefs.ErrUnavailable)
		}
	}
	removeStateFiles(stateDir)
	return id, nil
}

// killIdentity SIGKILLs id through a pidfd after checking, on that pidfd's
// process, that the start time still matches.
func killIdentity(id reaper.Identity) error {
	fd, err := unix.PidfdOpen(id.Pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(fd)
	// The pidfd pins the process: if it still has our start time now, the
	// signal below reaches it and nothing else.
	if same, err := id.Exists(); err != nil || !same {
		return err
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return os.NewSyscallError("pidfd_send_signal", err)
	}
	return nil
}

func removeStateFiles(stateDir string) {
	for _, name := range []string{PidFileName, QMPSocketName, AgentSocketName} {
		os.Remove(filepath.Join(stateDir, name))
	}
}
