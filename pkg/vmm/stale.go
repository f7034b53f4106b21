package vmm

import (
	"context"
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
		// No monitor recorded; a root left by one that died is removed.
		removeStateFiles(stateDir)
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
		if err := id.Signal(unix.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
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

func removeStateFiles(stateDir string) {
	removeRoot(filepath.Join(stateDir, RootDirName))
	removeRecordedCgroup(stateDir)
	for _, name := range []string{PidFileName, QMPSocketName, AgentSocketName} {
		os.Remove(filepath.Join(stateDir, name))
	}
}
