package manager

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// Config configures a Manager.
type Config struct {
	// StateRoot is the state directory (default DefaultStateRoot).
	StateRoot string
	// ShimBinary is the shim to bootstrap (default: FindShim(Self)).
	ShimBinary string
	// Self is the manager's executable, the shim's -publish-binary
	// (default: os.Executable()).
	Self string
}

// Manager creates, finds and removes boxes. It is cheap: every CLI
// invocation makes one.
type Manager struct {
	store *Store
	shim  shimCommand
	// shimErr says why no shim binary was found; it is reported only when
	// a shim is needed.
	shimErr error
	// imgs is the image store, opened on first use.
	imgs imageStore
}

// New opens the state directory and finds the shim binary. It makes the
// process the reaper's subreaper (shims reparent to it).
func New(cfg Config) (*Manager, error) {
	reaper.Default()
	if cfg.StateRoot == "" {
		cfg.StateRoot = DefaultStateRoot
	}
	store, err := OpenStore(cfg.StateRoot)
	if err != nil {
		return nil, err
	}
	if cfg.Self == "" {
		if cfg.Self, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	if err := store.ensureEventsSocket(); err != nil {
		return nil, err
	}
	m := &Manager{store: store}
	if cfg.ShimBinary == "" {
		cfg.ShimBinary, m.shimErr = FindShim(cfg.Self)
	}
	m.shim = shimCommand{
		binary:       cfg.ShimBinary,
		self:         cfg.Self,
		ttrpcAddress: store.EventsSocket(),
		grpcAddress:  filepath.Join(store.Root(), "grpc.sock"),
		socketDir:    store.SocketDir(),
	}
	return m, nil
}

// Store is the manager's state directory.
func (m *Manager) Store() *Store { return m.store }

// Stdio names the stdio of a task or exec as the shim gets them: FIFO
// paths, file:// or binary:// URIs, or "" for none.
type Stdio struct {
	Stdin, Stdout, Stderr string
}

// CreateOptions describe a new box.
type CreateOptions struct {
	// ID is the box id (default: NewID()).
	ID string
	// Name is an optional unique name.
	Name string
	// Labels are free key/value pairs to filter boxes by.
	Labels map[string]string
	// AutoRemove asks a daemon to remove the box once its process exited.
	AutoRemove bool
	// OpenStdin gives the process a stdin FIFO that the first attach
	// writes to (Service's stdio; ignored when Stdio is set).
	OpenStdin bool
	// Image names an image to run instead of Spec.Rootfs: pulled if the
	// store lacks it, its layers mounted as the box's rootfs, its config
	// applied to Spec's process.
	Image string
	// Spec is the box's process and rootfs.
	Spec BoxSpec
	// Stdio returns the task's stdio, given the box's directory (where
	// FIFOs go). Nil: no stdio.
	Stdio func(boxDir string) (Stdio, error)
}

// Create makes a box: its record and bundle, a shim bootstrapped for it,
// and the task created in the shim (which boots the VM). Nothing is left
// behind when it fails: the shim is shut down and reaped, the record and
// bundle removed.
func (m *Manager) Create(ctx context.Context, o CreateOptions) (_ *Box, retErr error) {
	if o.Image == "" {
		rootfs, err := checkRootfs(o.Spec.Rootfs)
		if err != nil {
			return nil, err
		}
		o.Spec.Rootfs = rootfs
	}
	if m.shimErr != nil {
		return nil, m.shimErr
	}
	if o.ID == "" {
		o.ID = NewID()
	}
	rec := &Record{
		ID: o.ID, Name: o.Name, Image: o.Image, Bundle: m.store.BundleDir(o.ID), Rootfs: o.Spec.Rootfs,
		Command: o.Spec.Args, Terminal: o.Spec.Terminal, Status: StatusCreated,
		Network: cmp.Or(o.Spec.Network, NetworkUser), Ports: o.Spec.Ports,
		Labels: o.Labels, AutoRemove: o.AutoRemove, CreatedAt: time.Now().UTC(),
		CreatorPid: self().Pid, CreatorStartTime: self().StartTime,
	}
	if err := m.store.Add(rec); err != nil {
		return nil, err
	}
	b := &Box{m: m, rec: rec}
	defer func() {
		if retErr != nil {
			if _, err := os.Lstat(m.store.BoxDir(o.ID)); errdefs.IsNotFound(retErr) && os.IsNotExist(err) {
				// Its record went: another command removed the box.
				retErr = errorf(errdefs.ErrAborted, "box %s was removed or stopped while it was being created", b.name())
			}
			if err := b.undo(); err != nil {
				retErr = fmt.Errorf("%w (and cleaning up: %v)", retErr, err)
			}
		}
	}()
	if o.Image != "" {
		name, err := m.mountImage(ctx, o.ID, o.Image, &o.Spec)
		if err != nil {
			return nil, err
		}
		if err := b.update(func(r *Record) { r.Image, r.Rootfs, r.Command = name, o.Spec.Rootfs, o.Spec.Args }); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(rec.Bundle, 0o711); err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	spec, err := GenerateSpec(o.ID, rec.Bundle, o.Spec)
	if err != nil {
		return nil, err
	}
	if err := writeBundle(rec.Bundle, spec); err != nil {
		return nil, err
	}
	var stdio Stdio
	if o.Stdio != nil {
		if stdio, err = o.Stdio(m.store.BoxDir(o.ID)); err != nil {
			return nil, err
		}
	}
	if err := b.bootstrap(ctx); err != nil {
		return nil, err
	}
	if err := b.update(func(r *Record) {
		r.Stdin, r.Stdout, r.Stderr = stdio.Stdin, stdio.Stdout, stdio.Stderr
	}); err != nil {
		return nil, err
	}
	resp, err := b.conn.task.Create(ctx, &taskapi.CreateTaskRequest{
		ID: o.ID, Bundle: rec.Bundle, Terminal: o.Spec.Terminal,
		Stdin: stdio.Stdin, Stdout: stdio.Stdout, Stderr: stdio.Stderr,
	})
	if err != nil {
		return nil, b.createError(err)
	}
	faultPoint("after-task-create")
	// The shim's task pid is its VMM's.
	vmm, _ := reaper.ReadIdentity(int(resp.GetPid()))
	if err := b.update(func(r *Record) {
		r.TaskPid, r.VMMPid, r.VMMStartTime = resp.GetPid(), vmm.Pid, vmm.StartTime
		r.clearCreator()
	}); err != nil {
		return nil, err
	}
	faultPoint("after-create")
	return b, nil
}

// bootstrap starts the box's shim, connects to it and records its address
// and identity.
func (b *Box) bootstrap(ctx context.Context) error {
	// Even a start action that fails may have spawned a shim: undo looks
	// for it.
	b.ours = true
	res, err := b.m.shim.start(ctx, b.rec.ID, b.rec.Bundle)
	if err != nil {
		return err
	}
	faultPoint("after-shim-start")
	// Record the address first: undo can then find the socket.
	if err := b.update(func(r *Record) { r.ShimAddress = res.Address }); err != nil {
		return err
	}
	faultPoint("after-shim-address")
	conn, err := dialShim(ctx, res.Address)
	if err != nil {
		return err
	}
	b.setConn(conn)
	id, err := shimPid(ctx, conn, b.rec.ID, b.rec.Bundle)
	if err != nil {
		return err
	}
	if err := b.update(func(r *Record) { r.ShimPid, r.ShimStartTime = id.Pid, id.StartTime }); err != nil {
		return err
	}
	faultPoint("after-bootstrap")
	return nil
}

// createError explains a failed task Create. A shim shut down meanwhile
// (another command removed or stopped the booting box) answers Aborted,
// or exits before its answer reaches us.
func (b *Box) createError(err error) error {
	if errdefs.IsAborted(errgrpc.ToNative(err)) {
		return errorf(errdefs.ErrAborted, "box %s was removed or stopped while it was being created", b.name())
	}
	if errors.Is(err, ttrpc.ErrClosed) && b.shimDied() {
		return errorf(errdefs.ErrAborted, "box %s: its shim exited while creating it", b.name())
	}
	return fmt.Errorf("create box: %w", errgrpc.ToNative(err))
}

// Get finds a box by id, name or id prefix and reconciles its record with
// its shim (see Box.refresh). An unknown box is errdefs.ErrNotFound with
// the message "no such box: REF".
func (m *Manager) Get(ctx context.Context, ref string) (*Box, error) {
	rec, err := m.store.Get(ref)
	if err != nil {
		return nil, err
	}
	b := &Box{m: m, rec: rec}
	if err := b.refresh(ctx); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// List reconciles and returns every box's record, oldest first. Records
// that cannot be read or reconciled are reported in the joined error; the
// others are still returned.
func (m *Manager) List(ctx context.Context) ([]Record, error) {
	recs, err := m.store.List()
	errs := []error{err}
	out := make([]Record, 0, len(recs))
	for _, rec := range recs {
		b := &Box{m: m, rec: rec}
		if err := b.refresh(ctx); err != nil {
			if errdefs.IsNotFound(err) {
				continue // removed meanwhile
			}
			errs = append(errs, fmt.Errorf("box %s: %w", rec.ID, err))
		}
		out = append(out, *b.rec)
		b.Close()
	}
	return out, errors.Join(errs...)
}
