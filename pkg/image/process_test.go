package image

import (
	"errors"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestProcessAppliesTheImageConfigLikeDockerRun(t *testing.T) {
	img := Image{Name: "docker.io/library/app:latest", Config: appConfig}
	tests := []struct {
		name string
		img  Image
		req  Process
		want Process
	}{
		{
			name: "image defaults",
			img:  img,
			want: Process{Args: []string{"/bin/app", "--serve"}, Env: []string{"PATH=/bin", "GREETING=hi"}, Cwd: "/srv", User: "1000:1000"},
		},
		{
			name: "request overrides",
			img:  img,
			req:  Process{Args: []string{"--once"}, Env: []string{"GREETING=hello", "EXTRA=1"}, Cwd: "/tmp", User: "root"},
			want: Process{Args: []string{"/bin/app", "--once"}, Env: []string{"PATH=/bin", "GREETING=hello", "EXTRA=1"}, Cwd: "/tmp", User: "root"},
		},
		{
			name: "no entrypoint, no workdir, no PATH",
			img:  Image{Config: ocispec.ImageConfig{Cmd: []string{"sh"}}},
			want: Process{Args: []string{"sh"}, Env: []string{defaultPath}, Cwd: "/"},
		},
		{
			name: "command given to an image without one",
			img:  Image{Config: ocispec.ImageConfig{Env: []string{"PATH=/x"}}},
			req:  Process{Args: []string{"true"}, Env: []string{"PATH=/y"}},
			want: Process{Args: []string{"true"}, Env: []string{"PATH=/y"}, Cwd: "/"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.img.Process(tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Args, tt.want.Args) || !slices.Equal(got.Env, tt.want.Env) || got.Cwd != tt.want.Cwd || got.User != tt.want.User {
				t.Errorf("Process(%+v) = %+v, want %+v", tt.req, got, tt.want)
			}
		})
	}
}

func TestProcessWithoutACommandIsAnError(t *testing.T) {
	img := Image{Name: "docker.io/library/nocmd:latest"}
	_, err := img.Process(Process{})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || err.Error() != "image docker.io/library/nocmd:latest has no command: give one" {
		t.Errorf("Process = %v", err)
	}
}

func TestNormalizeReadsReferencesLikeDocker(t *testing.T) {
	const dgst = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	tests := []struct{ ref, want string }{
		{"busybox", "docker.io/library/busybox:latest"},
		{"busybox:1.36", "docker.io/library/busybox:1.36"},
		{"boxlite/busybox:test", "docker.io/boxlite/busybox:test"},
		{"127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"},
		{"localhost/app:v1", "localhost/app:v1"},
		{"busybox@" + dgst, "docker.io/library/busybox@" + dgst},
	}
	for _, tt := range tests {
		if got, err := normalize(tt.ref); err != nil || got != tt.want {
			t.Errorf("normalize(%q) = %q, %v; want %q", tt.ref, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "Busybox", "a b", "busybox@sha256:short"} {
		if _, err := normalize(bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("normalize(%q) = %v; want an invalid-argument error", bad, err)
		}
	}
}
