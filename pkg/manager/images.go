package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/image"
)

// imagesDirName is the image store under the state directory: content,
// unpacked layers shared by every box, and which box uses which image.
const imagesDirName = "images"

// rootfsDirName is where an image box's rootfs is mounted (an overlay of the
// image's layers and the box's own upper directory) in its box directory.
const rootfsDirName = "rootfs"

// imageStore opens the state directory's image store once.
type imageStore struct {
	once  sync.Once
	store *image.Store
	err   error
}

// images returns the image store, opening it on first use.
func (m *Manager) images() (*image.Store, error) {
	m.imgs.once.Do(func() {
		m.imgs.store, m.imgs.err = image.Open(filepath.Join(m.store.Root(), imagesDirName))
	})
	return m.imgs.store, m.imgs.err
}

// imageAPI is the API's view of an image.
func imageAPI(i image.Image) api.Image {
	return api.Image{
		Name: i.Name, Digest: i.Digest.String(), Size: i.Size, Created: i.Created, Layers: len(i.Layers),
		Config: api.ImageConfig{
			Entrypoint: i.Config.Entrypoint, Cmd: i.Config.Cmd, Env: i.Config.Env,
			WorkingDir: i.Config.WorkingDir, User: i.Config.User,
		},
	}
}

// mountImage makes box id's rootfs from image ref (pulled first if the
// store lacks it) and applies the image's config to the box's process as
// docker run does. The mount is undone by unmountImage.
func (m *Manager) mountImage(ctx context.Context, id, ref string, spec *BoxSpec) (string, error) {
	store, err := m.images()
	if err != nil {
		return "", err
	}
	if _, err := store.Get(ref); errdefs.IsNotFound(err) {
		if _, err := store.Pull(ctx, ref); err != nil {
			return "", err
		}
	} else if err != nil {
		return "", err
	}
	boxDir := m.store.BoxDir(id)
	target := filepath.Join(boxDir, rootfsDirName)
	img, err := store.Mount(ctx, ref, id, boxDir, target)
	if err != nil {
		return "", err
	}
	p, err := img.Process(image.Process{Args: spec.Args, Env: spec.Env, Cwd: spec.Cwd, User: spec.User})
	if err != nil {
		return "", errors.Join(err, store.Unmount(id, target))
	}
	spec.Args, spec.Env, spec.Cwd, spec.User, spec.Rootfs = p.Args, p.Env, p.Cwd, p.User, target
	return img.Name, nil
}

// unmountImage undoes mountImage for a box record (nothing for a box
// without an image). A busy mount is an error, and the box's files stay.
func (m *Manager) unmountImage(r *Record) error {
	if r.Image == "" {
		return nil
	}
	store, err := m.images()
	if err != nil {
		return err
	}
	if err := store.Unmount(r.ID, filepath.Join(m.store.BoxDir(r.ID), rootfsDirName)); err != nil {
		return fmt.Errorf("box %s: unmounting its rootfs: %w", r.ID, err)
	}
	return nil
}

// PullImage pulls an image into the store.
func (s *Service) PullImage(ctx context.Context, ref string) (api.Image, error) {
	store, err := s.m.images()
	if err != nil {
		return api.Image{}, err
	}
	img, err := store.Pull(ctx, ref)
	if err != nil {
		return api.Image{}, err
	}
	return imageAPI(img), nil
}

// LoadImages imports an OCI layout or docker-save tarball.
func (s *Service) LoadImages(ctx context.Context, r io.Reader) ([]api.Image, error) {
	store, err := s.m.images()
	if err != nil {
		return nil, err
	}
	imgs, err := store.Load(ctx, r)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(imgs))
	for _, i := range imgs {
		out = append(out, imageAPI(i))
	}
	return out, nil
}

// ListImages lists the store's images.
func (s *Service) ListImages(ctx context.Context) ([]api.Image, error) {
	store, err := s.m.images()
	if err != nil {
		return nil, err
	}
	imgs, err := store.List()
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(imgs))
	for _, i := range imgs {
		out = append(out, imageAPI(i))
	}
	return out, nil
}

// RemoveImage removes an image no box uses.
func (s *Service) RemoveImage(ctx context.Context, ref string) error {
	store, err := s.m.images()
	if err != nil {
		return err
	}
	return store.Remove(ctx, ref)
}
