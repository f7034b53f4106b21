// Package image keeps OCI images by name on the host and gives each box a
// rootfs made from one: the images that `boxlite run IMAGE` runs.
//
// A Store lives in one directory:
//
//	content/         containerd's local content store (manifests, configs, layer blobs)
//	layers/<hex>/    each layer unpacked once, named by its chain ID, shared by every box
//	index.json       names → images, and which box uses which image's layers
//	*.lock           flock(2) files that make the store safe for concurrent processes
//
// Images come from a registry (Pull) or a tarball (Load, OCI layout or
// docker save). Mount stacks an image's layers as the read-only lower
// directories of an overlay mount whose upper directory belongs to one box,
// so that boxes share every layer on disk and each writes only its own
// files. Remove refuses while a box uses an image and collects the content
// and layers no image or box refers to any more.
//
// The fetching, importing and unpacking are containerd's own: its local
// content store, its docker resolver and image handlers, its archive
// importer and its layer applier (with overlay-style whiteouts).
package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Image is an image in the store, under one name.
type Image struct {
	// Name is the normalised reference, e.g. docker.io/library/busybox:latest.
	Name string `json:"name"`
	// Digest is the digest of the image's manifest (for the store's
	// platform, when the name points at an index).
	Digest digest.Digest `json:"digest"`
	// Config is what the image says to run: Entrypoint, Cmd, Env,
	// WorkingDir, User, ...
	Config ocispec.ImageConfig `json:"config"`
	// Size is the bytes of the image's content as fetched: manifest, config
	// and (compressed) layers.
	Size int64 `json:"size"`
	// Created is when the image was built, as its config says; zero if it
	// does not say.
	Created time.Time `json:"created"`
	// Layers are the chain IDs of the image's layers, bottom first.
	Layers []digest.Digest `json:"layers"`
}

// Store keeps images by name under one directory. Its methods are safe for
// concurrent use, by goroutines and by processes sharing the directory.
type Store struct {
	// root is the store's directory, absolute.
	root string
	// content is containerd's local content store in root/content.
	content content.Store
	// platform selects an image's manifest from an index, and an image
	// whose config names another platform is refused.
	platform platforms.MatchComparer
	// platformName is platform's specifier, for messages.
	platformName string
	// dockerConfig is the docker CLI config file credentials are read from.
	dockerConfig string
}

// Opt is an option of Open.
type Opt func(*Store) error

// WithPlatform makes the store pull and load images for platform (an OCI
// platform specifier such as linux/arm64) instead of linux/amd64, the
// platform of boxlite's guests.
func WithPlatform(platform string) Opt {
	return func(s *Store) error {
		p, err := platforms.Parse(platform)
		if err != nil {
			return errclass.Errorf(errdefs.ErrInvalidArgument, "platform %q: %w", platform, err)
		}
		s.platform, s.platformName = platforms.Only(p), platforms.Format(p)
		return nil
	}
}

// WithDockerConfig makes the store read registry credentials from path (a
// docker CLI config.json) instead of $DOCKER_CONFIG/config.json or
// ~/.docker/config.json.
func WithDockerConfig(path string) Opt {
	return func(s *Store) error {
		s.dockerConfig = path
		return nil
	}
}

// Open opens the store in root, making the directory if needed. root must
// not contain ':' or ',', which overlay mount options cannot carry.
func Open(root string, opts ...Opt) (*Store, error) {
	noDecompressionChildren()
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	if err := checkOverlayPath("image store", root); err != nil {
		return nil, err
	}
	s := &Store{root: root, dockerConfig: defaultDockerConfig()}
	if err := WithPlatform("linux/amd64")(s); err != nil {
		return nil, err
	}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(s.layersDir(), 0o700); err != nil {
		return nil, err
	}
	if s.content, err = openContent(filepath.Join(root, "content")); err != nil {
		return nil, fmt.Errorf("open content store: %w", err)
	}
	return s, nil
}

// noDecompressionChildren keeps containerd's compression package from
// running igzip or unpigz as children it waits for itself (archive import
// decompresses through it): in a process whose one reaper collects every
// child, its Wait would lose the exit and fail the import. Its in-process
// gzip is used instead. The package reads these variables once, at its
// first decompression.
func noDecompressionChildren() {
	for _, env := range []string{"CONTAINERD_DISABLE_IGZIP", "CONTAINERD_DISABLE_PIGZ"} {
		if os.Getenv(env) == "" {
			os.Setenv(env, "1")
		}
	}
}

// openContent opens containerd's local content store. It warns once per
// open that a filesystem without fs-verity has none (every tmpfs, ext4
// without the feature): noise to every boxlite command, so its level is
// raised to error for the moment of the open.
func openContent(dir string) (content.Store, error) {
	level := log.L.Logger.GetLevel()
	if level >= logrus.WarnLevel && level < logrus.DebugLevel {
		log.L.Logger.SetLevel(logrus.ErrorLevel)
		defer log.L.Logger.SetLevel(level)
	}
	return local.NewStore(dir)
}

// Get returns the image named ref (normalised as Pull does).
func (s *Store) Get(ref string) (Image, error) {
	name, err := normalize(ref)
	if err != nil {
		return Image{}, err
	}
	idx, err := s.readIndex()
	if err != nil {
		return Image{}, err
	}
	rec, ok := idx.Images[name]
	if !ok {
		return Image{}, errclass.Errorf(errdefs.ErrNotFound, "image %s not found", name)
	}
	return rec.Image, nil
}

// List returns every image in the store, sorted by name.
func (s *Store) List() ([]Image, error) {
	idx, err := s.readIndex()
	if err != nil {
		return nil, err
	}
	out := make([]Image, 0, len(idx.Images))
	for _, name := range slices.Sorted(maps.Keys(idx.Images)) {
		out = append(out, idx.Images[name].Image)
	}
	return out, nil
}

// index is the content of index.json.
type index struct {
	// Images are the named images, by name.
	Images map[string]imageRecord `json:"images"`
	// Boxes are the boxes with a rootfs mounted (or being mounted) from an
	// image, by box ID.
	Boxes map[string]boxRecord `json:"boxes"`
}

// imageRecord is one named image.
type imageRecord struct {
	Image
	// Blobs are the compressed layers, in the order of Image.Layers.
	Blobs []ocispec.Descriptor `json:"blobs"`
	// DiffIDs are the digests of the uncompressed layers, as the config's
	// rootfs lists them.
	DiffIDs []digest.Digest `json:"diff_ids"`
	// Content is every blob the image keeps in the content store: the
	// index the name resolved to (if any), the manifest, the config and
	// the layers.
	Content []digest.Digest `json:"content"`
}

// boxRecord is one box's use of an image.
type boxRecord struct {
	// Image is the image the box's rootfs was made from, as it was then:
	// its layers stay while the box uses them, even if the name is
	// removed or points elsewhere since.
	Image Image `json:"image"`
	// Target is where the rootfs is mounted.
	Target string `json:"target"`
	// BoxDir holds the overlay's upper and work directories.
	BoxDir string `json:"box_dir"`
}

func (s *Store) indexPath() string { return filepath.Join(s.root, "index.json") }
func (s *Store) layersDir() string { return filepath.Join(s.root, "layers") }
func (s *Store) lockPath(name string) string {
	return filepath.Join(s.root, name)
}

// layerDir is where the layer with chain ID chainID is unpacked. The
// directory is named by the hex alone: overlay's lowerdir option cannot
// carry the ':' of "sha256:...".
func (s *Store) layerDir(chainID digest.Digest) string {
	return filepath.Join(s.layersDir(), chainID.Encoded())
}

// readIndex reads index.json; a missing file is an empty index.
func (s *Store) readIndex() (index, error) {
	idx := index{Images: map[string]imageRecord{}, Boxes: map[string]boxRecord{}}
	data, err := os.ReadFile(s.indexPath())
	if errors.Is(err, fs.ErrNotExist) {
		return idx, nil
	}
	if err != nil {
		return idx, err
	}
	if err := json.Unmarshal(data, &idx); err != nil {
		return idx, fmt.Errorf("read %s: %w", s.indexPath(), err)
	}
	if idx.Images == nil {
		idx.Images = map[string]imageRecord{}
	}
	if idx.Boxes == nil {
		idx.Boxes = map[string]boxRecord{}
	}
	return idx, nil
}

// writeIndex replaces index.json atomically (write, fsync, rename).
func (s *Store) writeIndex(idx index) error {
	data, err := json.MarshalIndent(idx, "", "\t")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(s.root, ".index-*.json")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.indexPath())
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", s.indexPath(), err)
	}
	return nil
}

// updateIndex applies fn to index.json under the index lock and writes the
// result if fn returns nil.
func (s *Store) updateIndex(ctx context.Context, fn func(*index) error) error {
	unlock, err := lockFile(ctx, s.lockPath(indexLock), lockEx)
	if err != nil {
		return err
	}
	defer unlock()
	idx, err := s.readIndex()
	if err != nil {
		return err
	}
	if err := fn(&idx); err != nil {
		return err
	}
	return s.writeIndex(idx)
}

// checkOverlayPath refuses a path that overlay's mount options cannot
// carry.
func checkOverlayPath(what, path string) error {
	if strings.ContainsAny(path, ":,") {
		return errclass.Errorf(errdefs.ErrInvalidArgument, "%s %q: a path with ':' or ',' cannot be an overlay directory", what, path)
	}
	return nil
}
