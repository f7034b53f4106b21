package integration

// A read-only registry for the critest images: it serves the images of an
// OCI image-layout tarball (scripts/critest-images.sh) over the pull half
// of the registry HTTP API (the /v2/ check, manifests by tag or digest,
// blobs), one listener per registry host (registry.k8s.io, gcr.io, ...),
// each on 127.0.0.1 inside the test's network namespace. containerd is
// pointed at it by hosts.toml files whose server is the listener itself, so
// no request ever leaves the machine.

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/pkg/netns"
)

// layoutRegistry holds a layout's blobs and the manifests of its named
// images.
type layoutRegistry struct {
	// blobs are the layout's blobs by digest ("sha256:...").
	blobs map[string][]byte
	// manifestTypes are the media types of the manifest blobs by digest.
	manifestTypes map[string]string
	// tags maps host → "repo:tag" → manifest descriptor.
	tags map[string]map[string]ocispec.Descriptor
	// served counts the manifest and blob responses.
	served atomic.Int64
}

// loadLayout reads an OCI image-layout tarball into memory.
func loadLayout(path string) (*layoutRegistry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := &layoutRegistry{blobs: map[string][]byte{}, manifestTypes: map[string]string{}, tags: map[string]map[string]ocispec.Descriptor{}}
	var index ocispec.Index
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return nil, err
		}
		switch {
		case h.Name == "index.json":
			if err := json.Unmarshal(data, &index); err != nil {
				return nil, fmt.Errorf("%s: index.json: %w", path, err)
			}
		case strings.HasPrefix(h.Name, "blobs/sha256/"):
			r.blobs["sha256:"+strings.TrimPrefix(h.Name, "blobs/sha256/")] = data
		}
	}
	for _, desc := range index.Manifests {
		name := desc.Annotations[images.AnnotationImageName]
		// Names are fully qualified and tagged: host/repo:tag.
		host, rest, _ := strings.Cut(name, "/")
		repo, tag, ok := strings.Cut(rest, ":")
		if !strings.Contains(host, ".") || !ok || strings.ContainsAny(tag, "/@") {
			return nil, fmt.Errorf("%s: image name %q is not host/repo:tag", path, name)
		}
		if r.tags[host] == nil {
			r.tags[host] = map[string]ocispec.Descriptor{}
		}
		r.tags[host][repo+":"+tag] = desc
		r.manifestTypes[desc.Digest.String()] = desc.MediaType
		if _, ok := r.blobs[desc.Digest.String()]; !ok {
			return nil, fmt.Errorf("%s: manifest %s of %s missing", path, desc.Digest, name)
		}
	}
	return r, nil
}

// hosts are the registry hosts the layout has images of.
func (r *layoutRegistry) hosts() []string {
	var hs []string
	for h := range r.tags {
		hs = append(hs, h)
	}
	return hs
}

// handler serves host's images.
func (r *layoutRegistry) handler(host string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			registryError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "read-only registry")
			return
		}
		p := strings.TrimPrefix(req.URL.Path, "/v2/")
		if p == req.URL.Path {
			registryError(w, http.StatusNotFound, "NOT_FOUND", req.URL.Path)
			return
		}
		if p == "" {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, "{}")
			return
		}
		if i := strings.LastIndex(p, "/manifests/"); i > 0 {
			repo, ref := p[:i], p[i+len("/manifests/"):]
			d := ref
			if !strings.HasPrefix(ref, "sha256:") {
				desc, ok := r.tags[host][repo+":"+ref]
				if !ok {
					registryError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", host+"/"+repo+":"+ref)
					return
				}
				d = desc.Digest.String()
			}
			mediaType, ok := r.manifestTypes[d]
			if !ok {
				registryError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", host+"/"+repo+"@"+d)
				return
			}
			r.write(w, req, mediaType, d)
			return
		}
		if i := strings.LastIndex(p, "/blobs/"); i > 0 {
			d := p[i+len("/blobs/"):]
			if _, ok := r.blobs[d]; !ok {
				registryError(w, http.StatusNotFound, "BLOB_UNKNOWN", d)
				return
			}
			r.write(w, req, "application/octet-stream", d)
			return
		}
		registryError(w, http.StatusNotFound, "NOT_FOUND", req.URL.Path)
	})
}

// write answers with blob d.
func (r *layoutRegistry) write(w http.ResponseWriter, req *http.Request, mediaType, d string) {
	data := r.blobs[d]
	w.Header().Set("Content-Type", mediaType)
	w.Header().Set("Docker-Content-Digest", d)
	w.Header().Set("Content-Length", fmt.Sprint(len(data)))
	r.served.Add(1)
	if req.Method == http.MethodGet {
		w.Write(data)
	}
}

// registryError writes an error in the registry API's format.
func registryError(w http.ResponseWriter, status int, code, detail string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": detail}}})
}

// serveRegistry serves the layout at tarball, one listener per registry
// host on 127.0.0.1 inside the network namespace at nsPath, until cleanup,
// and writes containerd's hosts.toml for each host under certsDir. It
// returns the registry, for its counters.
func serveRegistry(t testing.TB, tarball, nsPath, certsDir string) *layoutRegistry {
	t.Helper()
	r, err := loadLayout(tarball)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.Open(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	for _, host := range r.hosts() {
		var l net.Listener
		if err := netns.Do(ns, func() error {
			var err error
			l, err = net.Listen("tcp", "127.0.0.1:0")
			return err
		}); err != nil {
			t.Fatalf("registry for %s: listen: %v", host, err)
		}
		srv := &http.Server{Handler: r.handler(host)}
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.Serve(l)
		}()
		t.Cleanup(func() {
			srv.Close()
			<-done
		})
		// The server is the local registry itself: no fallback to the
		// real host is ever tried.
		toml := fmt.Sprintf("server = \"http://%s\"\n", l.Addr())
		dir := filepath.Join(certsDir, host)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return r
}
