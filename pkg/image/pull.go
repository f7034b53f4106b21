package image

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/errclass"
)

// Pull fetches the image ref names from its registry into the store (only
// the blobs the store lacks: pulling an image again fetches its manifest's
// digest and nothing else) and names it. ref is normalised as docker does:
// "busybox" is docker.io/library/busybox:latest. From an index, the
// manifest for the store's platform is taken.
//
// Registries on loopback hosts (localhost, 127.0.0.0/8, ::1) are spoken to
// in plain HTTP, every other one over TLS. Credentials come from the docker
// CLI config file (see WithDockerConfig). Pulls from several processes
// share the store; their writes into the content store take turns.
//
// An unreachable registry is errdefs.ErrUnavailable, an unknown image
// errdefs.ErrNotFound. A failed pull leaves no partial content behind.
func (s *Store) Pull(ctx context.Context, ref string) (Image, error) {
	name, err := normalize(ref)
	if err != nil {
		return Image{}, err
	}
	unlock, err := lockFile(ctx, s.lockPath(gcLock), lockSh)
	if err != nil {
		return Image{}, err
	}
	rec, replaced, err := s.pull(ctx, name)
	unlock()
	if err != nil || replaced {
		// Drop what the failed pull wrote, or what the name pointed at
		// before, unless another operation is in flight (then a later
		// collection does).
		s.tryCollect(ctx)
	}
	if err != nil {
		return Image{}, err
	}
	return rec.Image, nil
}

// pull does Pull's work under the shared gc lock; replaced is whether the
// name pointed at other content before.
func (s *Store) pull(ctx context.Context, name string) (_ imageRecord, replaced bool, _ error) {
	client := &http.Client{Transport: docker.DefaultHTTPTransport(nil)}
	// Nothing is kept between pulls: no idle connection outlives this one.
	defer client.CloseIdleConnections()
	creds := func(host string) (string, string, error) { return credentials(s.dockerConfig, host) }
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithClient(client),
			docker.WithPlainHTTP(docker.MatchLocalhost),
			docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthClient(client), docker.WithAuthCreds(creds))),
		),
	})
	_, target, err := resolver.Resolve(ctx, name)
	if errdefs.IsNotFound(err) {
		return imageRecord{}, false, errclass.Errorf(errdefs.ErrNotFound, "pull %s: image not found in the registry", name)
	}
	if err != nil {
		return imageRecord{}, false, pullError(name, err)
	}
	fetcher, err := resolver.Fetcher(ctx, name)
	if err != nil {
		return imageRecord{}, false, pullError(name, err)
	}

	unlockIngest, err := lockFile(ctx, s.lockPath(ingestLock), lockEx)
	if err != nil {
		return imageRecord{}, false, err
	}
	err = images.Dispatch(ctx, images.Handlers(remotes.FetchHandler(s.content, fetcher), s.childrenHandler()), nil, target)
	unlockIngest()
	if err != nil {
		return imageRecord{}, false, pullError(name, err)
	}

	rec, err := s.resolve(ctx, name, target)
	if err != nil {
		return imageRecord{}, false, fmt.Errorf("pull %s: %w", name, err)
	}
	err = s.updateIndex(ctx, func(idx *index) error {
		if old, ok := idx.Images[name]; ok && !slices.Equal(old.Content, rec.Content) {
			replaced = true
		}
		idx.Images[name] = rec
		return nil
	})
	return rec, replaced, err
}

// pullError describes a failed pull; a registry that cannot be reached is
// errdefs.ErrUnavailable.
func pullError(name string, err error) error {
	var netErr *net.OpError
	if errors.As(err, &netErr) && !errdefs.IsNotFound(err) {
		return errclass.Errorf(errdefs.ErrUnavailable, "pull %s: registry unreachable: %w", name, err)
	}
	return fmt.Errorf("pull %s: %w", name, err)
}
