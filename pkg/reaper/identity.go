package reaper

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Identity names one process across pid reuse: its pid and its start time in
// clock ticks since boot (field 22 of /proc/<pid>/stat).
type Identity struct {
	// Pid is the process id.
	Pid int
	// StartTime is the process start time in clock ticks since boot.
	StartTime uint64
}

// String formats the identity as written to pid files: "pid starttime".
func (id Identity) String() string {
	return fmt.Sprintf("%d %d", id.Pid, id.StartTime)
}

// procRoot is where /proc is mounted; tests point it elsewhere.
var procRoot = "/proc"

// procStat holds the fields of /proc/<pid>/stat that the reaper needs.
type procStat struct {
	state     byte
	ppid      int
	flags     uint64
	startTime uint64
}

// readProcStat parses /proc/<pid>/stat. A missing process is errdefs.ErrNotFound.
func readProcStat(pid int) (procStat, error) {
	f, err := os.Open(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, procError(pid, err)
	}
	defer f.Close()
	statOpened(pid)
	data, err := io.ReadAll(f)
	if err != nil {
		return procStat{}, procError(pid, err)
	}
	return parseProcStat(data)
}

// statOpened runs between the open and the read of a stat file; tests use it
// to make the process disappear in that window.
var statOpened = func(pid int) {}

// procError maps an error reading /proc/<pid>/... to errdefs.ErrNotFound when
// it means the process is gone. A process reaped after its file was opened
// makes the read fail with ESRCH rather than the open with ENOENT.
func procError(pid int, err error) error {
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("process %d: %w", pid, errdefs.ErrNotFound)
	}
	return err
}

// parseProcStat parses the contents of a /proc/<pid>/stat file. The command
// name (field 2) may contain spaces and parentheses, so fields are counted
// from the last ')'.
func parseProcStat(data []byte) (procStat, error) {
	end := bytes.LastIndexByte(data, ')')
	if end < 0 || end+2 > len(data) {
		return procStat{}, fmt.Errorf("malformed /proc stat %q", truncate(data))
	}
	// fields[0] is field 3 (state).
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 20 {
		return procStat{}, fmt.Errorf("malformed /proc stat %q: %d fields", truncate(data), len(fields)+2)
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat ppid %q: %w", fields[1], err)
	}
	flags, err := strconv.ParseUint(fields[6], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat flags %q: %w", fields[6], err)
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat starttime %q: %w", fields[19], err)
	}
	return procStat{state: fields[0][0], ppid: ppid, flags: flags, startTime: start}, nil
}

func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

// ReadIdentity returns the identity of the live (or zombie) process pid.
func ReadIdentity(pid int) (Identity, error) {
	st, err := readProcStat(pid)
	if err != nil {
		return Identity{}, err
	}
	return Identity{Pid: pid, StartTime: st.startTime}, nil
}

// Running reports whether the process id names is still running: the pid
// exists, is not a zombie, and has the same start time (so a reused pid is
// not mistaken for it).
func (id Identity) Running() (bool, error) {
	st, same, err := id.stat()
	return same && st.state != 'Z' && st.state != 'X', err
}

// Exists reports whether the process is still present, possibly as a zombie
// that nobody reaped yet, with the same start time.
func (id Identity) Exists() (bool, error) {
	_, same, err := id.stat()
	return same, err
}

// stat reads id's process and says whether it is id (same start time). A
// missing process is not an error.
func (id Identity) stat() (procStat, bool, error) {
	if id.Pid <= 0 {
		return procStat{}, false, nil
	}
	st, err := readProcStat(id.Pid)
	if errdefs.IsNotFound(err) {
		return procStat{}, false, nil
	}
	if err != nil {
		return procStat{}, false, err
	}
	return st, st.startTime == id.StartTime, nil
}

// WritePidFile atomically writes id to path as "pid starttime\n".
func WritePidFile(path string, id Identity) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(id.String()+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ReadPidFile reads a pid file written by WritePidFile. A missing file is
// errdefs.ErrNotFound; a malformed one is errdefs.ErrDataLoss.
func ReadPidFile(path string) (Identity, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Identity{}, fmt.Errorf("pid file %s: %w", path, errdefs.ErrNotFound)
	}
	if err != nil {
		return Identity{}, err
	}
	if len(data) > 64 {
		return Identity{}, fmt.Errorf("pid file %s: too long: %w", path, errdefs.ErrDataLoss)
	}
	var id Identity
	if _, err := fmt.Sscanf(string(data), "%d %d\n", &id.Pid, &id.StartTime); err != nil || id.Pid <= 0 {
		return Identity{}, fmt.Errorf("pid file %s: malformed %q: %w", path, data, errdefs.ErrDataLoss)
	}
	return id, nil
}

// Children lists the pids whose parent is ppid, zombies included, as /proc
// shows them now. Leak checks use it to attribute processes by ancestry.
func Children(ppid int) []int {
	entries, _ := os.ReadDir(procRoot)
	var kids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readProcStat(pid); err == nil && st.ppid == ppid {
			kids = append(kids, pid)
		}
	}
	return kids
}

// Signal sends sig to the process id names, through a pidfd opened first and
// checked (with the pidfd holding the process) against id's start time, so a
// reused pid is never hit. A process that is gone, or is another process
// now, is errdefs.ErrNotFound. A zombie accepts the signal and ignores it.
func (id Identity) Signal(sig unix.Signal) error {
	gone := fmt.Errorf("pid %d: %w", id.Pid, errdefs.ErrNotFound)
	if id.Pid <= 0 {
		return gone
	}
	fd, err := unix.PidfdOpen(id.Pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return gone
	}
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(fd)
	if same, err := id.Exists(); err != nil || !same {
		return gone
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return gone
		}
		return os.NewSyscallError("pidfd_send_signal", err)
	}
	return nil
}

// pfExiting is the kernel's PF_EXITING task flag (field 9 of /proc/<pid>/stat).
const pfExiting = 0x4

// Exiting says process pid is gone or on its way out: no longer in /proc, a
// zombie, exiting (PF_EXITING), or with a SIGKILL pending. It tells a call
// that failed because its target was being killed from a real failure.
func Exiting(pid int) bool {
	st, err := readProcStat(pid)
	if err != nil {
		return true
	}
	if st.state == 'Z' || st.state == 'X' || st.flags&pfExiting != 0 {
		return true
	}
	status, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "status"))
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		if mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && mask&(1<<(unix.SIGKILL-1)) != 0 {
			return true
		}
	}
	return false
}
