package registrytest

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/pkg/reaper"
)

func TestMain(m *testing.M) {
	// The registry is started through the reaper, the one owner of wait.
	reaper.Default()
	os.Exit(m.Run())
}

// tinyImage returns an image of one empty layer, and its blobs.
func tinyImage(t *testing.T) (ocispec.Descriptor, Blobs) {
	t.Helper()
	blobs := Blobs{}
	add := func(mediaType string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
		blobs[d.Digest] = b
		return d
	}
	var layer bytes.Buffer
	tar.NewWriter(&layer).Close()
	config, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(layer.Bytes())}}})
	manifest, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: add(ocispec.MediaTypeImageConfig, config), Layers: []ocispec.Descriptor{add(ocispec.MediaTypeImageLayer, layer.Bytes())}})
	return add(ocispec.MediaTypeImageManifest, manifest), blobs
}

// getManifest GETs path (a manifest) through the proxy as user:password
// ("" for none) and returns the status and the digest the registry names.
func getManifest(t *testing.T, r *Registry, path, userPassword string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+r.Host()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
	if userPassword != "" {
		user, password, _ := strings.Cut(userPassword, ":")
		req.SetBasicAuth(user, password)
	}
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Docker-Content-Digest")
}

// TestPushedImageIsServedThroughTheRecordingProxy: what Push pushed is
// served through Host, each request is recorded once, RequireAuth gates
// the proxy, and when the test ends no registry process, zombie or
// goroutine is left.
func TestPushedImageIsServedThroughTheRecordingProxy(t *testing.T) {
	leakcheck.Children(t)
	leakcheck.Goroutines(t)
	r := Start(t)
	desc, blobs := tinyImage(t)
	if got := r.Push(t, desc, blobs, "test/tiny:v1"); got != desc.Digest {
		t.Errorf("Push returned %s, want %s", got, desc.Digest)
	}
	if got := r.TakeRequests(); len(got) != 0 {
		t.Errorf("the push went through the proxy: %v", got)
	}
	const path = "/v2/test/tiny/manifests/v1"
	if status, d := getManifest(t, r, path, ""); status != http.StatusOK || d != desc.Digest.String() {
		t.Errorf("GET %s: %d, digest %s; want 200, %s", path, status, d, desc.Digest)
	}
	if got, want := r.TakeRequests(), []string{"GET " + path}; !slices.Equal(got, want) {
		t.Errorf("recorded %v, want %v", got, want)
	}
	r.RequireAuth("alice:s3cret")
	if status, _ := getManifest(t, r, path, ""); status != http.StatusUnauthorized {
		t.Errorf("GET %s without credentials: %d, want 401", path, status)
	}
	if status, _ := getManifest(t, r, path, "alice:s3cret"); status != http.StatusOK {
		t.Errorf("GET %s with credentials: %d, want 200", path, status)
	}
}
