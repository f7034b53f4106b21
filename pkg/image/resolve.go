package image

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/errclass"
)

// childrenHandler returns the children of a descriptor read from the
// content store, keeping from an index only the best manifest for the
// store's platform (containerd's pull does the same).
func (s *Store) childrenHandler() images.HandlerFunc {
	return images.LimitManifests(images.FilterPlatforms(images.ChildrenHandler(s.content), s.platform), s.platform, 1)
}

// collector records every descriptor an image walk visits.
type collector struct {
	// mu guards descs: images.Dispatch calls handlers concurrently.
	mu sync.Mutex
	// descs are the visited descriptors. Guarded by mu.
	descs []ocispec.Descriptor
}

// handler returns an images.Handler that records each descriptor.
func (c *collector) handler() images.HandlerFunc {
	return func(_ context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		c.mu.Lock()
		c.descs = append(c.descs, desc)
		c.mu.Unlock()
		return nil, nil
	}
}

// resolve reads the image that target (a manifest or an index) names from
// the content store and returns its record under name. Every blob of the
// image must be present.
func (s *Store) resolve(ctx context.Context, name string, target ocispec.Descriptor) (imageRecord, error) {
	var c collector
	if err := images.Walk(ctx, images.Handlers(c.handler(), s.childrenHandler()), target); err != nil {
		return imageRecord{}, fmt.Errorf("image %s: %w", name, err)
	}
	var manifestDesc *ocispec.Descriptor
	rec := imageRecord{Image: Image{Name: name}}
	for i, d := range c.descs {
		if _, err := s.content.Info(ctx, d.Digest); errdefs.IsNotFound(err) {
			return imageRecord{}, errclass.Errorf(errdefs.ErrNotFound, "image %s: blob %s (%s) is missing", name, d.Digest, d.MediaType)
		} else if err != nil {
			return imageRecord{}, fmt.Errorf("image %s: blob %s: %w", name, d.Digest, err)
		}
		if !slices.Contains(rec.Content, d.Digest) {
			rec.Content = append(rec.Content, d.Digest)
		}
		if images.IsManifestType(d.MediaType) && manifestDesc == nil {
			manifestDesc = &c.descs[i]
		}
	}
	if manifestDesc == nil {
		return imageRecord{}, errclass.Errorf(errdefs.ErrNotFound, "image %s: no manifest for %s", name, s.platformName)
	}

	var manifest ocispec.Manifest
	if err := readJSON(ctx, s.content, *manifestDesc, &manifest); err != nil {
		return imageRecord{}, fmt.Errorf("image %s: manifest: %w", name, err)
	}
	var config ocispec.Image
	if err := readJSON(ctx, s.content, manifest.Config, &config); err != nil {
		return imageRecord{}, fmt.Errorf("image %s: config: %w", name, err)
	}
	if config.OS != "" && config.Architecture != "" && !s.platform.Match(config.Platform) {
		return imageRecord{}, errclass.Errorf(errdefs.ErrNotFound, "image %s is for %s, not %s", name, platforms.Format(config.Platform), s.platformName)
	}
	if len(config.RootFS.DiffIDs) != len(manifest.Layers) {
		return imageRecord{}, errclass.Errorf(errdefs.ErrInvalidArgument, "image %s: %d layers but %d diff IDs in its config", name, len(manifest.Layers), len(config.RootFS.DiffIDs))
	}
	for _, d := range config.RootFS.DiffIDs {
		if err := d.Validate(); err != nil {
			return imageRecord{}, errclass.Errorf(errdefs.ErrInvalidArgument, "image %s: diff ID %q: %w", name, d, err)
		}
	}
	for _, l := range manifest.Layers {
		if !images.IsLayerType(l.MediaType) {
			return imageRecord{}, errclass.Errorf(errdefs.ErrNotImplemented, "image %s: layer %s has media type %q", name, l.Digest, l.MediaType)
		}
	}

	rec.Digest = manifestDesc.Digest
	rec.Config = config.Config
	if config.Created != nil {
		rec.Created = *config.Created
	}
	rec.Size = manifestDesc.Size + manifest.Config.Size
	for _, l := range manifest.Layers {
		rec.Size += l.Size
		rec.Blobs = append(rec.Blobs, ocispec.Descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size})
	}
	rec.DiffIDs = slices.Clone(config.RootFS.DiffIDs)
	// identity.ChainIDs rewrites its argument in place.
	rec.Layers = identity.ChainIDs(slices.Clone(rec.DiffIDs))
	return rec, nil
}

// readJSON decodes the blob desc names.
func readJSON(ctx context.Context, provider content.Provider, desc ocispec.Descriptor, v any) error {
	p, err := content.ReadBlob(ctx, provider, desc)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(p, v); err != nil {
		return fmt.Errorf("%s: %w", desc.Digest, err)
	}
	return nil
}
