package image

import (
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"

	"github.com/boxlite/boxlite/internal/errclass"
)

// normalize returns the full name of an image reference the way docker
// reads it: "busybox" is docker.io/library/busybox:latest, a tag defaults
// to latest, and a reference with a digest keeps the digest (and drops a
// tag given with it).
func normalize(ref string) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", errclass.Errorf(errdefs.ErrInvalidArgument, "invalid image reference %q: %w", ref, err)
	}
	return named.String(), nil
}
