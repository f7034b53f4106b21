package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	digest "github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Mount makes target the rootfs of box boxID from the image ref names: an
// overlay mount whose lower directories are the image's layers (each
// unpacked once into the store and shared by every box) and whose upper
// and work directories are boxDir/upper and boxDir/work, so the box's
// writes stay in boxDir. boxDir must exist; target, upper and work are made
// if missing. The store records that boxID uses the image, and keeps its
// layers while it does, even if the image is removed or re-pulled.
//
// Mount of a box the store already records (after a host restart, say)
// mounts its recorded layers again, over its existing upper directory; if
// target is mounted already it does nothing. A box has one rootfs: Mount
// with another target, box directory or image is errdefs.ErrAlreadyExists.
// When Mount fails, nothing is mounted, recorded or newly made.
func (s *Store) Mount(ctx context.Context, ref, boxID, boxDir, target string) (Image, error) {
	if boxID == "" {
		return Image{}, errclass.Errorf(errdefs.ErrInvalidArgument, "mount image %s: empty box ID", ref)
	}
	name, err := normalize(ref)
	if err != nil {
		return Image{}, err
	}
	if boxDir, err = filepath.Abs(boxDir); err != nil {
		return Image{}, err
	}
	if target, err = filepath.Abs(target); err != nil {
		return Image{}, err
	}
	if err := checkOverlayPath("box directory", boxDir); err != nil {
		return Image{}, err
	}
	if fi, err := os.Stat(boxDir); err != nil {
		return Image{}, fmt.Errorf("mount image %s: box directory: %w", name, err)
	} else if !fi.IsDir() {
		return Image{}, errclass.Errorf(errdefs.ErrInvalidArgument, "mount image %s: box directory %s is not a directory", name, boxDir)
	}

	unlock, err := lockFile(ctx, s.lockPath(gcLock), lockSh)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	idx, err := s.readIndex()
	if err != nil {
		return Image{}, err
	}
	want := boxRecord{Target: target, BoxDir: boxDir}
	if box, ok := idx.Boxes[boxID]; ok {
		if box.Target != target || box.BoxDir != boxDir || box.Image.Name != name {
			return Image{}, errclass.Errorf(errdefs.ErrAlreadyExists, "box %s already has a rootfs from %s at %s", boxID, box.Image.Name, box.Target)
		}
		if err := s.remount(box); err != nil {
			return Image{}, err
		}
		return box.Image, nil
	}
	rec, ok := idx.Images[name]
	if !ok {
		return Image{}, errclass.Errorf(errdefs.ErrNotFound, "image %s not found", name)
	}
	want.Image = rec.Image
	for i := range rec.Layers {
		if err := s.unpack(ctx, rec.Layers[i], rec.DiffIDs[i], rec.Blobs[i]); err != nil {
			return Image{}, fmt.Errorf("mount image %s: %w", name, err)
		}
	}

	var undo cleanup
	defer undo.run()
	// Record first: from now on garbage collection keeps the layers.
	err = s.updateIndex(ctx, func(idx *index) error {
		if box, ok := idx.Boxes[boxID]; ok {
			return errclass.Errorf(errdefs.ErrAlreadyExists, "box %s already has a rootfs from %s at %s", boxID, box.Image.Name, box.Target)
		}
		idx.Boxes[boxID] = want
		return nil
	})
	if err != nil {
		return Image{}, err
	}
	undo.add(func() {
		err := s.updateIndex(context.WithoutCancel(ctx), func(idx *index) error {
			delete(idx.Boxes, boxID)
			return nil
		})
		if err != nil {
			log.G(ctx).WithError(err).WithField("id", boxID).Warn("image store: cannot drop the record of a failed mount")
		}
	})
	if err := s.mountOverlay(rec.Layers, boxDir, target, &undo); err != nil {
		return Image{}, fmt.Errorf("mount image %s for box %s: %w", name, boxID, err)
	}
	undo.release()
	return rec.Image, nil
}

// remount mounts a recorded box's rootfs again unless it is mounted.
func (s *Store) remount(box boxRecord) error {
	mounted, err := isMounted(box.Target)
	if err != nil || mounted {
		return err
	}
	var undo cleanup
	defer undo.run()
	if err := s.mountOverlay(box.Image.Layers, box.BoxDir, box.Target, &undo); err != nil {
		return fmt.Errorf("mount image %s again: %w", box.Image.Name, err)
	}
	undo.release()
	return nil
}

// mountOverlay mounts at target an overlay of the unpacked layers (bottom
// first in layers) under boxDir/upper, making the directories it needs and
// registering their removal (and the unmount) on undo.
func (s *Store) mountOverlay(layers []digest.Digest, boxDir, target string, undo *cleanup) error {
	var lowers []string
	for _, l := range slices.Backward(layers) {
		dir := s.layerDir(l)
		if _, err := os.Stat(dir); err != nil {
			return fmt.Errorf("layer %s: %w", l, err)
		}
		lowers = append(lowers, dir)
	}
	if len(lowers) == 0 {
		// overlay needs a lower directory: an image without layers
		// gets an empty one.
		empty := filepath.Join(boxDir, "lower")
		if err := makeDir(empty, undo, os.Remove); err != nil {
			return err
		}
		lowers = append(lowers, empty)
	}
	upper, work := filepath.Join(boxDir, "upper"), filepath.Join(boxDir, "work")
	for _, dir := range []string{upper, work} {
		if err := makeDir(dir, undo, os.RemoveAll); err != nil {
			return err
		}
	}
	// Never removed recursively: if it is still mounted, that would
	// delete through the mount.
	if err := makeDir(target, undo, os.Remove); err != nil {
		return err
	}
	m := mount.Mount{
		Type:    "overlay",
		Source:  "overlay",
		Options: []string{"lowerdir=" + strings.Join(lowers, ":"), "upperdir=" + upper, "workdir=" + work},
	}
	// containerd's Mount shortens a lowerdir option too long for one page.
	if err := m.Mount(target); err != nil {
		return err
	}
	undo.add(func() {
		if err := unmountAll(target); err != nil {
			log.L.WithError(err).WithField("target", target).Warn("image store: cannot unmount a failed mount")
		}
	})
	return nil
}

// makeDir makes dir (its parent must exist) unless it exists, and if it
// made it registers remove(dir) on undo.
func makeDir(dir string, undo *cleanup, remove func(string) error) error {
	err := os.Mkdir(dir, 0o755)
	if errors.Is(err, fs.ErrExist) {
		return nil
	}
	if err != nil {
		return err
	}
	undo.add(func() {
		if err := remove(dir); err != nil {
			log.L.WithError(err).Warn("image store: cannot remove a directory of a failed mount")
		}
	})
	return nil
}

// Unmount undoes Mount for box boxID: it unmounts target and then drops
// the record that the box uses its image. It is idempotent: a target that
// is not mounted (or does not exist) and a box the store does not record
// are not errors. A busy mount is errdefs.ErrFailedPrecondition and is
// left mounted and recorded (no lazy unmount). boxDir/upper and work stay:
// they are the box's, for its owner to delete.
func (s *Store) Unmount(boxID, target string) error {
	target, err := filepath.Abs(target)
	if err != nil {
		return err
	}
	idx, err := s.readIndex()
	if err != nil {
		return err
	}
	if box, ok := idx.Boxes[boxID]; ok && box.Target != target {
		return errclass.Errorf(errdefs.ErrInvalidArgument, "unmount box %s: its rootfs is at %s, not %s", boxID, box.Target, target)
	}
	if err := unmountAll(target); err != nil {
		return fmt.Errorf("unmount rootfs of box %s: %w", boxID, err)
	}
	ctx := context.Background()
	orphaned := false
	err = s.updateIndex(ctx, func(idx *index) error {
		box, ok := idx.Boxes[boxID]
		if !ok {
			return nil
		}
		delete(idx.Boxes, boxID)
		orphaned = !idx.keepsLayers(box.Image.Layers)
		return nil
	})
	if err != nil {
		return err
	}
	if orphaned {
		// The box was the last user of layers no image names any more.
		s.tryCollect(ctx)
	}
	return nil
}

// keepsLayers reports whether every one of layers is used by an image or a
// box of idx.
func (idx *index) keepsLayers(layers []digest.Digest) bool {
	keep := idx.liveLayers()
	for _, l := range layers {
		if !keep[l] {
			return false
		}
	}
	return true
}

// isMounted reports whether something is mounted at path; a path that does
// not exist is not mounted.
func isMounted(path string) (bool, error) {
	mounted, err := mountinfo.Mounted(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return mounted, err
}

// unmountAll unmounts path until nothing is mounted there. It never
// detaches lazily: a busy mount is errdefs.ErrFailedPrecondition.
func unmountAll(path string) error {
	for {
		mounted, err := isMounted(path)
		if err != nil || !mounted {
			return err
		}
		err = unix.Unmount(path, unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
			// Check again: mounts may be stacked.
		case errors.Is(err, unix.EINVAL):
			return nil // unmounted meanwhile
		case errors.Is(err, unix.EBUSY):
			return errclass.Errorf(errdefs.ErrFailedPrecondition, "unmount %s: busy (a process still uses it): %w", path, os.NewSyscallError("umount2", err))
		default:
			return &os.PathError{Op: "umount2", Path: path, Err: err}
		}
	}
}

// cleanup is a stack of undo steps: run runs them last first, unless
// release was called.
type cleanup struct {
	// steps are the undo steps, in the order added.
	steps []func()
}

func (c *cleanup) add(step func()) { c.steps = append(c.steps, step) }

func (c *cleanup) release() { c.steps = nil }

func (c *cleanup) run() {
	for _, step := range slices.Backward(c.steps) {
		step()
	}
	c.steps = nil
}
