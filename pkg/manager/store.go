package manager

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/network"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// DefaultStateRoot is the state directory when neither --state nor
// $BOXLITE_STATE says otherwise.
const DefaultStateRoot = "/run/boxlite"

// StateRootEnv names the environment variable that overrides DefaultStateRoot.
const StateRootEnv = "BOXLITE_STATE"

// Names inside the state directory and a box's directory.
const (
	boxesDir      = "boxes"
	socketDirName = "s"
	lockName      = "lock"
	recordName    = "record.json"
	bundleName    = "bundle"
	ioDirName     = "io"
	logFileName   = "box.log"
)

// maxSocketDir is the longest socket directory the shim can use: its socket
// is <dir>/<64 hex digits> and sun_path holds 107 bytes plus a NUL.
const maxSocketDir = 107 - 1 - 64

// Status is the state of a box's task as the manager last saw it.
type Status string

// Statuses of a box.
const (
	// StatusCreated: the task exists in the shim but was not started.
	StatusCreated Status = "created"
	// StatusRunning: the task's process is running.
	StatusRunning Status = "running"
	// StatusPaused: the task is frozen.
	StatusPaused Status = "paused"
	// StatusStopped: the process exited (ExitStatus says how) or its shim
	// or VMM died (exit 137).
	StatusStopped Status = "stopped"
	// StatusUnknown: the shim is alive but did not answer.
	StatusUnknown Status = "unknown"
)

// Record is what the manager keeps about one box, as JSON in
// <state>/boxes/<id>/record.json. Field names are the template names of
// boxlite inspect --format.
type Record struct {
	// ID is the box's unique id, also the task id in the shim.
	ID string `json:"id"`
	// Name is the optional unique name given with --name.
	Name string `json:"name,omitempty"`
	// Image is the image the box runs (its rootfs is the image's layers
	// mounted with the box's own upper directory), or "".
	Image string `json:"image,omitempty"`
	// Bundle is the OCI bundle directory, the shim's working directory.
	Bundle string `json:"bundle"`
	// Rootfs is the absolute root filesystem directory (root.path).
	Rootfs string `json:"rootfs"`
	// Command is the box's process arguments.
	Command []string `json:"command"`
	// Terminal says the process has a pseudo-terminal.
	Terminal bool `json:"terminal,omitempty"`
	// Stdin, Stdout and Stderr are the stdio paths or URIs given to the shim.
	Stdin  string `json:"stdin,omitempty"`
	Stdout string `json:"stdout,omitempty"`
	Stderr string `json:"stderr,omitempty"`
	// ShimAddress is the shim's ttrpc address (unix://path).
	ShimAddress string `json:"shim_address,omitempty"`
	// ShimPid and ShimStartTime identify the long-lived shim process.
	ShimPid       int    `json:"shim_pid,omitempty"`
	ShimStartTime uint64 `json:"shim_start_time,omitempty"`
	// VMMPid and VMMStartTime identify the box's VMM (QEMU), when known.
	VMMPid       int    `json:"vmm_pid,omitempty"`
	VMMStartTime uint64 `json:"vmm_start_time,omitempty"`
	// TaskPid is the process's pid as the shim reports it.
	TaskPid uint32 `json:"task_pid,omitempty"`
	// Status is the last known state of the task.
	Status Status `json:"status"`
	// ExitStatus is the exit code once Status is stopped (128+n for a
	// signal n; 137 when the shim or VMM died).
	ExitStatus uint32 `json:"exit_status"`
	// ExitedAt is when the process exited.
	ExitedAt time.Time `json:"exited_at,omitzero"`
	// OOMKilled says the shim reported an OOM kill in the box.
	OOMKilled bool `json:"oom_killed,omitempty"`
	// Health is the box's health as the shim last reported it: starting,
	// healthy, unhealthy or disabled (empty before the box started).
	Health string `json:"health,omitempty"`
	// Network is the network the box was given: user, none or netns:PATH.
	Network string `json:"network,omitempty"`
	// Ports are the ports published with user networking.
	Ports []string `json:"ports,omitempty"`
	// Interfaces are the box's configured network interfaces with their
	// addresses, once it started.
	Interfaces []network.InfoInterface `json:"interfaces,omitempty"`
	// Labels are the key/value pairs given at create, to filter by.
	Labels map[string]string `json:"labels,omitempty"`
	// AutoRemove says the daemon removes the box once its process exited.
	AutoRemove bool `json:"auto_remove,omitempty"`
	// CreatedAt is when the box was created.
	CreatedAt time.Time `json:"created_at"`
	// CreatorPid and CreatorStartTime identify the manager process
	// creating the box until its Create returned: a box whose creator
	// died before that is recovered by the next reader (recoverCreate).
	CreatorPid       int    `json:"creator_pid,omitempty"`
	CreatorStartTime uint64 `json:"creator_start_time,omitempty"`
}

// ShimIdentity is the shim's pid and start time (zero when no shim is known).
func (r Record) ShimIdentity() reaper.Identity {
	return reaper.Identity{Pid: r.ShimPid, StartTime: r.ShimStartTime}
}

// VMMIdentity is the VMM's pid and start time (zero when not known).
func (r Record) VMMIdentity() reaper.Identity {
	return reaper.Identity{Pid: r.VMMPid, StartTime: r.VMMStartTime}
}

// clearShim forgets the shim and VMM, which are gone.
func (r *Record) clearShim() {
	r.ShimAddress, r.ShimPid, r.ShimStartTime = "", 0, 0
	r.VMMPid, r.VMMStartTime = 0, 0
}

// markStopped records an exit unless the record already holds one.
func (r *Record) markStopped(status uint32, at time.Time) {
	if r.Status == StatusStopped {
		return
	}
	r.Status, r.ExitStatus, r.ExitedAt = StatusStopped, status, at
}

// Store is the state directory: one directory per box under boxes/, the
// shims' socket directory s/, and a lock file serializing changes across
// manager processes.
type Store struct {
	root string
}

// validName is what containerd accepts as an id, and what a box name must be.
var validName = regexp.MustCompile(`^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$`)

// OpenStore opens (creating if needed) the state directory root. A root that
// cannot be created or written, or is too long for the shims' sockets, is an
// error with one line saying so.
func OpenStore(root string) (*Store, error) {
	if root == "" {
		return nil, errors.New("state directory: empty path")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", root, err)
	}
	s := &Store{root: abs}
	if n := len(s.SocketDir()); n > maxSocketDir {
		return nil, fmt.Errorf("state directory %s is too long for unix sockets (%d bytes, at most %d): use a shorter --state",
			abs, len(abs), maxSocketDir-len(socketDirName)-1)
	}
	for _, d := range []string{abs, filepath.Join(abs, boxesDir), s.SocketDir()} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, fmt.Errorf("state directory %s is not usable: %w", abs, unwrapPath(err))
		}
	}
	probe, err := os.CreateTemp(abs, ".probe-")
	if err != nil {
		return nil, fmt.Errorf("state directory %s is not writable: %w", abs, unwrapPath(err))
	}
	probe.Close()
	os.Remove(probe.Name())
	return s, nil
}

// unwrapPath drops the path from a *PathError, whose message repeats it.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Root is the absolute state directory.
func (s *Store) Root() string { return s.root }

// SocketDir is where shims put their sockets (BootstrapParams.socket_dir).
func (s *Store) SocketDir() string { return filepath.Join(s.root, socketDirName) }

// BoxDir is the directory of box id.
func (s *Store) BoxDir(id string) string { return filepath.Join(s.root, boxesDir, id) }

// BundleDir is the OCI bundle of box id.
func (s *Store) BundleDir(id string) string { return filepath.Join(s.BoxDir(id), bundleName) }

// NewID returns a fresh random box id.
func NewID() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// lock takes the store's exclusive lock; the returned function releases it.
func (s *Store) lock() (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.root, lockName), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", s.root, unwrapPath(err))
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, os.NewSyscallError("flock", err)
	}
	return func() { f.Close() }, nil
}

// Add creates the directory and record of a new box. The id must be new and
// the name (if any) unused: otherwise errdefs.ErrAlreadyExists. The box
// directory appears atomically with its record.
func (s *Store) Add(rec *Record) error {
	if !validName.MatchString(rec.ID) {
		return errorf(errdefs.ErrInvalidArgument, "invalid box id %q", rec.ID)
	}
	if rec.Name != "" && !validName.MatchString(rec.Name) {
		return errorf(errdefs.ErrInvalidArgument, "invalid box name %q: use letters, digits and . _ - between them", rec.Name)
	}
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Lstat(s.BoxDir(rec.ID)); err == nil {
		return errorf(errdefs.ErrAlreadyExists, "box id %s already exists", rec.ID)
	}
	if rec.Name != "" {
		recs, _ := s.list()
		for _, r := range recs {
			if r.Name == rec.Name || r.ID == rec.Name {
				return errorf(errdefs.ErrAlreadyExists, "a box named %q already exists (id %s)", rec.Name, r.ID)
			}
		}
	}
	tmp, err := os.MkdirTemp(filepath.Join(s.root, boxesDir), ".new-")
	if err != nil {
		return fmt.Errorf("state directory %s is not writable: %w", s.root, unwrapPath(err))
	}
	if err := writeRecord(tmp, rec); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Chmod(tmp, 0o711); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, s.BoxDir(rec.ID)); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	return nil
}

// writeRecord writes rec into dir atomically: a temporary file, fsync, rename.
func writeRecord(dir string, rec *Record) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".record-")
	if err != nil {
		return fmt.Errorf("write box record: %w", err)
	}
	_, err = f.Write(append(data, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, recordName))
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write box record: %w", err)
	}
	return nil
}

// readRecord reads the record in dir. A missing record is ErrNotFound; one
// that does not parse is ErrDataLoss, with the path to remove.
func readRecord(dir string) (*Record, error) {
	path := filepath.Join(dir, recordName)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, errorf(errdefs.ErrNotFound, "box record %s", path)
	}
	if err != nil {
		return nil, err
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, errorf(errdefs.ErrDataLoss, "box record %s is corrupted (%v): remove %s", path, err, dir)
	}
	if rec.ID != filepath.Base(dir) {
		return nil, errorf(errdefs.ErrDataLoss, "box record %s is corrupted (id %q does not match its directory): remove %s", path, rec.ID, dir)
	}
	return &rec, nil
}

// Get finds a box by id, name, or unique id prefix. An unknown reference is
// errdefs.ErrNotFound with the message "no such box: REF".
func (s *Store) Get(ref string) (*Record, error) {
	if ref == "" {
		return nil, errorf(errdefs.ErrNotFound, "no such box: %q", ref)
	}
	if validName.MatchString(ref) {
		rec, err := readRecord(s.BoxDir(ref))
		if err == nil || !errdefs.IsNotFound(err) {
			return rec, err
		}
	}
	recs, err := s.list()
	var prefixed []*Record
	for _, r := range recs {
		if r.Name == ref {
			return r, nil
		}
		if strings.HasPrefix(r.ID, ref) {
			prefixed = append(prefixed, r)
		}
	}
	switch {
	case len(prefixed) == 1:
		return prefixed[0], nil
	case len(prefixed) > 1:
		return nil, errorf(errdefs.ErrInvalidArgument, "box reference %q is ambiguous (%d boxes)", ref, len(prefixed))
	case err != nil:
		// A corrupted record might be the one asked for: say so.
		return nil, fmt.Errorf("no such box: %s (%w)", ref, err)
	}
	return nil, errorf(errdefs.ErrNotFound, "no such box: %s", ref)
}

// List returns every box record, oldest first. Records that cannot be read
// are left out and reported in the joined error.
func (s *Store) List() ([]*Record, error) {
	return s.list()
}

func (s *Store) list() ([]*Record, error) {
	entries, err := os.ReadDir(filepath.Join(s.root, boxesDir))
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", s.root, unwrapPath(err))
	}
	var recs []*Record
	var errs []error
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		rec, err := readRecord(filepath.Join(s.root, boxesDir, e.Name()))
		if err != nil {
			if !errdefs.IsNotFound(err) {
				errs = append(errs, err)
			}
			continue
		}
		recs = append(recs, rec)
	}
	sort.Slice(recs, func(i, j int) bool {
		if !recs[i].CreatedAt.Equal(recs[j].CreatedAt) {
			return recs[i].CreatedAt.Before(recs[j].CreatedAt)
		}
		return recs[i].ID < recs[j].ID
	})
	return recs, errors.Join(errs...)
}

// Update applies fn to the current record of box id under the store lock
// and writes the result atomically. fn returning an error leaves the record
// unchanged. A removed box is errdefs.ErrNotFound.
func (s *Store) Update(id string, fn func(*Record) error) (*Record, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	rec, err := readRecord(s.BoxDir(id))
	if err != nil {
		return nil, err
	}
	if err := fn(rec); err != nil {
		return nil, err
	}
	if err := writeRecord(s.BoxDir(id), rec); err != nil {
		return nil, err
	}
	return rec, nil
}

// Remove deletes box id's directory: record, bundle and stdio files. The
// record goes first (renamed away), so a crash midway leaves no half box.
func (s *Store) Remove(id string) error {
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	dir := s.BoxDir(id)
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if m := mountUnder(dir); m != "" {
		return fmt.Errorf("remove box %s: %s is still mounted: unmount it first", id, m)
	}
	trash := filepath.Join(s.root, boxesDir, ".rm-"+id)
	os.RemoveAll(trash)
	if err := os.Rename(dir, trash); err != nil {
		return fmt.Errorf("remove box %s: %w", id, err)
	}
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("remove box %s: %w", id, err)
	}
	return nil
}

// mountUnder returns a mount point at or below dir, or "".
func mountUnder(dir string) string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			return mp
		}
	}
	return ""
}

// unescapeMountinfo decodes the octal escapes (\040 for a space) of a
// mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
