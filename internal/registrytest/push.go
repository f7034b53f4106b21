package registrytest

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Push pushes the image desc describes (a manifest or an index, with every
// blob it refers to, read from provider) to the registry as repo:tag,
// directly: the proxy neither records nor gates it. It returns desc's
// digest, which a pull of Host()/repo:tag resolves to.
func (r *Registry) Push(t testing.TB, desc ocispec.Descriptor, provider content.Provider, repoTag string) digest.Digest {
	t.Helper()
	ctx := context.Background()
	client := &http.Client{Transport: docker.DefaultHTTPTransport(nil)}
	defer client.CloseIdleConnections()
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithClient(client), docker.WithPlainHTTP(docker.MatchLocalhost)),
	})
	pusher, err := resolver.Pusher(ctx, r.direct+"/"+repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remotes.PushContent(ctx, pusher, desc, provider, nil, platforms.All, nil); err != nil {
		t.Fatalf("push %s: %v", repoTag, err)
	}
	return desc.Digest
}

// Blobs is a content.Provider of blobs in memory, by digest.
type Blobs map[digest.Digest][]byte

var _ content.Provider = Blobs(nil)

// ReaderAt returns a reader of desc's blob.
func (b Blobs) ReaderAt(_ context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	data, ok := b[desc.Digest]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, errdefs.ErrNotFound)
	}
	return memReader{bytes.NewReader(data)}, nil
}

// memReader is a content.ReaderAt of a blob in memory.
type memReader struct{ *bytes.Reader }

func (memReader) Close() error { return nil }

// Layout is an OCI image-layout tarball read into memory.
type Layout struct {
	// Blobs are its blobs.
	Blobs Blobs
	// Images are the manifests (or indexes) of its index by image name:
	// the io.containerd.image.name annotation, as containerd's import
	// reads it.
	Images map[string]ocispec.Descriptor
}

// ReadLayout reads the OCI image-layout tarball at path; it fails the test
// unless the tarball names at least one image.
func ReadLayout(t testing.TB, path string) Layout {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l := Layout{Blobs: Blobs{}, Images: map[string]ocispec.Descriptor{}}
	var index []byte
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read %s: %v", path, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("read %s: %s: %v", path, h.Name, err)
		}
		name := strings.TrimPrefix(h.Name, "./")
		switch {
		case name == ocispec.ImageIndexFile:
			index = data
		case strings.HasPrefix(name, "blobs/sha256/"):
			l.Blobs[digest.NewDigestFromEncoded(digest.SHA256, strings.TrimPrefix(name, "blobs/sha256/"))] = data
		}
	}
	var idx ocispec.Index
	if err := json.Unmarshal(index, &idx); err != nil {
		t.Fatalf("%s: %s: %v", path, ocispec.ImageIndexFile, err)
	}
	for _, desc := range idx.Manifests {
		if name := desc.Annotations[images.AnnotationImageName]; name != "" {
			l.Images[name] = desc
		}
	}
	if len(l.Images) == 0 {
		t.Fatalf("%s names no image (no %s annotation)", path, images.AnnotationImageName)
	}
	return l
}

// Image returns the descriptor of the layout's image name, failing the
// test if it has none.
func (l Layout) Image(t testing.TB, name string) ocispec.Descriptor {
	t.Helper()
	desc, ok := l.Images[name]
	if !ok {
		t.Fatalf("the layout has no image %s (it has %d others)", name, len(l.Images))
	}
	return desc
}
