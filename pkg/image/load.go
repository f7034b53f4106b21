package image

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/archive"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Load imports the images of a tarball, an OCI image layout or the output
// of docker save, and names each by the name the tarball gives it: the
// io.containerd.image.name annotation or a full reference in
// org.opencontainers.image.ref.name (OCI), or RepoTags (docker save). A
// manifest without a name is skipped; a tarball that names no image is an
// error. An existing name is replaced. A failed load leaves no partial
// content behind and names nothing.
func (s *Store) Load(ctx context.Context, r io.Reader) ([]Image, error) {
	unlock, err := lockFile(ctx, s.lockPath(gcLock), lockSh)
	if err != nil {
		return nil, err
	}
	loaded, err := s.load(ctx, r)
	unlock()
	// The tarball's own index is garbage once read, and so is whatever a
	// failed load wrote or a replaced name pointed at.
	s.tryCollect(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Image, len(loaded))
	for i, rec := range loaded {
		out[i] = rec.Image
	}
	return out, nil
}

// load does Load's work under the shared gc lock.
func (s *Store) load(ctx context.Context, r io.Reader) ([]imageRecord, error) {
	unlockIngest, err := lockFile(ctx, s.lockPath(ingestLock), lockEx)
	if err != nil {
		return nil, err
	}
	idxDesc, err := archive.ImportIndex(ctx, s.content, r)
	unlockIngest()
	if err != nil {
		return nil, errclass.Errorf(errdefs.ErrInvalidArgument, "load image archive: %w", err)
	}
	var idx ocispec.Index
	if err := readJSON(ctx, s.content, idxDesc, &idx); err != nil {
		return nil, errclass.Errorf(errdefs.ErrInvalidArgument, "load image archive: index: %w", err)
	}

	var loaded []imageRecord
	for _, desc := range idx.Manifests {
		name := archiveName(desc.Annotations)
		if name == "" {
			log.G(ctx).WithField("digest", desc.Digest).Warn("image archive: skipping a manifest without a name")
			continue
		}
		name, err := normalize(name)
		if err != nil {
			return nil, fmt.Errorf("load image archive: %w", err)
		}
		rec, err := s.resolve(ctx, name, desc)
		if err != nil {
			return nil, fmt.Errorf("load image archive: %w", err)
		}
		loaded = append(loaded, rec)
	}
	if len(loaded) == 0 {
		return nil, errclass.Errorf(errdefs.ErrInvalidArgument, "load image archive: it names no image (no %s annotation, no full reference in %s, no RepoTags)", images.AnnotationImageName, ocispec.AnnotationRefName)
	}
	err = s.updateIndex(ctx, func(idx *index) error {
		for _, rec := range loaded {
			idx.Images[rec.Name] = rec
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return loaded, nil
}

// archiveName is the name an imported manifest's annotations give it, as
// containerd's import reads them; an OCI ref name that is only a tag
// ("latest") names nothing, since there is no repository to put it in.
func archiveName(annotations map[string]string) string {
	if name := annotations[images.AnnotationImageName]; name != "" {
		return name
	}
	name := annotations[ocispec.AnnotationRefName]
	if strings.ContainsAny(name, "/:@") {
		return name
	}
	return ""
}
