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

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Remove removes the name ref (normalised as Pull does), then deletes the
// content and the unpacked layers that no image and no box uses any more.
// While a box uses the image and no other name points at it, Remove is
// errdefs.ErrFailedPrecondition naming the boxes; removing one of several
// names of an image only drops that name. Remove waits for the pulls, loads
// and mounts in flight to finish.
func (s *Store) Remove(ctx context.Context, ref string) error {
	name, err := normalize(ref)
	if err != nil {
		return err
	}
	unlock, err := lockFile(ctx, s.lockPath(gcLock), lockEx)
	if err != nil {
		return err
	}
	defer unlock()
	err = s.updateIndex(ctx, func(idx *index) error {
		rec, ok := idx.Images[name]
		if !ok {
			return errclass.Errorf(errdefs.ErrNotFound, "image %s not found", name)
		}
		for other, o := range idx.Images {
			if other != name && o.Digest == rec.Digest {
				delete(idx.Images, name)
				return nil
			}
		}
		var users []string
		for id, box := range idx.Boxes {
			if box.Image.Digest == rec.Digest {
				users = append(users, id)
			}
		}
		if len(users) > 0 {
			slices.Sort(users)
			return errclass.Errorf(errdefs.ErrFailedPrecondition, "image %s is in use by box %s", name, strings.Join(users, ", "))
		}
		delete(idx.Images, name)
		return nil
	})
	if err != nil {
		return err
	}
	return s.collect(ctx)
}

// tryCollect collects garbage if no operation is in flight (the gc lock is
// free), and otherwise leaves it to a later collection.
func (s *Store) tryCollect(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	unlock, ok, err := tryLockFile(s.lockPath(gcLock))
	if err != nil || !ok {
		log.G(ctx).WithError(err).Debug("image store: garbage collection deferred")
		return
	}
	defer unlock()
	if err := s.collect(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("image store: garbage collection failed")
	}
}

// collect deletes what no image or box of the index uses: blobs, ingests
// (partial writes), unpacked layers and layers half unpacked. The caller
// holds the gc lock exclusively, so nothing is being written or read.
func (s *Store) collect(ctx context.Context) error {
	idx, err := s.readIndex()
	if err != nil {
		return err
	}
	var errs []error

	keepContent := map[digest.Digest]bool{}
	for _, rec := range idx.Images {
		for _, d := range rec.Content {
			keepContent[d] = true
		}
	}
	var garbage []digest.Digest
	err = s.content.Walk(ctx, func(info content.Info) error {
		if !keepContent[info.Digest] {
			garbage = append(garbage, info.Digest)
		}
		return nil
	})
	if !errors.Is(err, fs.ErrNotExist) { // no blob written yet
		errs = append(errs, err)
	}
	for _, d := range garbage {
		if err := s.content.Delete(ctx, d); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	statuses, err := s.content.ListStatuses(ctx)
	errs = append(errs, err)
	for _, st := range statuses {
		if err := s.content.Abort(ctx, st.Ref); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, err)
		}
	}

	keepLayers := idx.liveLayers()
	entries, err := os.ReadDir(s.layersDir())
	errs = append(errs, err)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), tmpPrefix) && keepLayers[digest.NewDigestFromEncoded(digest.Canonical, e.Name())] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(s.layersDir(), e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("image store garbage collection: %w", err)
	}
	return nil
}

// liveLayers returns the chain IDs of the layers the images and the boxes
// of idx use.
func (idx *index) liveLayers() map[digest.Digest]bool {
	keep := map[digest.Digest]bool{}
	for _, rec := range idx.Images {
		for _, l := range rec.Layers {
			keep[l] = true
		}
	}
	for _, box := range idx.Boxes {
		for _, l := range box.Image.Layers {
			keep[l] = true
		}
	}
	return keep
}
