package image

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/registrytest"
)

func TestPullByNameThenPullAgainFetchesNothing(t *testing.T) {
	e := newEnv(t)
	reg := registrytest.Start(t)
	img := buildImage(t, appConfig, baseLayer(t), topLayer(t))
	name := push(t, reg, img, "test/app:latest")
	ctx := context.Background()

	// Without a tag the name is :latest.
	got, err := e.store.Pull(ctx, strings.TrimSuffix(name, ":latest"))
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != name || got.Digest != img.manifest.Digest || len(got.Layers) != 2 {
		t.Errorf("Pull = %+v; want name %s, digest %s, 2 layers", got, name, img.manifest.Digest)
	}
	if !slices.Equal(got.Config.Entrypoint, appConfig.Entrypoint) || got.Config.WorkingDir != "/srv" || got.Created.IsZero() {
		t.Errorf("Pull config = %+v, created %v", got.Config, got.Created)
	}
	first := reg.TakeRequests()
	if blobs := countPrefix(first, "GET /v2/test/app/blobs/"); blobs != 3 {
		t.Errorf("first pull fetched %d blobs, want 3 (config, 2 layers): %v", blobs, first)
	}
	if g, err := e.store.Get(name); err != nil || g.Digest != got.Digest {
		t.Errorf("Get(%s) = %+v, %v", name, g, err)
	}

	again, err := e.store.Pull(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if again.Digest != got.Digest {
		t.Errorf("second pull: digest %s, want %s", again.Digest, got.Digest)
	}
	second := reg.TakeRequests()
	for _, r := range second {
		if !strings.HasPrefix(r, "HEAD /v2/test/app/manifests/") {
			t.Errorf("second pull fetched %q; want only the tag resolved (HEAD manifest): %v", r, second)
		}
	}
	if len(second) == 0 {
		t.Error("second pull did not resolve the tag")
	}
	if list, err := e.store.List(); err != nil || len(list) != 1 {
		t.Errorf("List() = %v, %v; want one image", list, err)
	}
}

func TestPullWithCredentialsFromDockerConfig(t *testing.T) {
	cfgDir := t.TempDir()
	cfgPath := filepath.Join(cfgDir, "config.json")
	e := newEnv(t, WithDockerConfig(cfgPath))
	reg := registrytest.Start(t)
	name := push(t, reg, buildImage(t, appConfig, baseLayer(t)), "test/private:v1")
	reg.RequireAuth("alice:s3cret")
	ctx := context.Background()

	if _, err := e.store.Pull(ctx, name); err == nil {
		t.Fatal("pull without credentials succeeded")
	}
	e.assertClean(t)

	auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	cfg := fmt.Sprintf(`{"auths": {"http://%s/v2/": {"auth": %q}}}`, reg.Host(), auth)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Pull(ctx, name); err != nil {
		t.Fatalf("pull with credentials: %v", err)
	}
}

func TestPullFailuresAreClearAndLeaveNothing(t *testing.T) {
	e := newEnv(t)
	reg := registrytest.Start(t)
	closed := registrytest.ClosedHost(t)
	tests := []struct {
		name  string
		ref   string
		class error
		says  string
	}{
		{"bad reference", "Not A Reference!", errdefs.ErrInvalidArgument, "invalid image reference"},
		{"unreachable registry", closed + "/test/app:v1", errdefs.ErrUnavailable, "registry unreachable"},
		{"unknown image", reg.Host() + "/test/nothing:v1", errdefs.ErrNotFound, "not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.store.Pull(context.Background(), tt.ref)
			if !errors.Is(err, tt.class) || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("Pull(%q) = %v; want %v saying %q", tt.ref, err, tt.class, tt.says)
			}
			e.assertClean(t)
		})
	}
}

func TestPullCancelledMidwayLeavesNothing(t *testing.T) {
	e := newEnv(t)
	reg := registrytest.Start(t)
	name := push(t, reg, buildImage(t, appConfig, baseLayer(t), topLayer(t)), "test/app:v1")
	stalled := reg.StallBlobs()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-stalled // a blob is half written into the content store
		cancel()
	}()
	if _, err := e.store.Pull(ctx, name); !errors.Is(err, context.Canceled) {
		t.Fatalf("pull cancelled while a blob was half fetched = %v; want context.Canceled", err)
	}
	e.assertClean(t)
}

func countPrefix(list []string, prefix string) int {
	n := 0
	for _, s := range list {
		if strings.HasPrefix(s, prefix) {
			n++
		}
	}
	return n
}
