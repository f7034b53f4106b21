package manager

import (
	"cmp"
	"maps"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/health"
)

func TestCreateOptionsFromRequestRefusesBadRequests(t *testing.T) {
	rootfs := t.TempDir()
	good := func(edit func(*api.CreateRequest)) api.CreateRequest {
		r := api.CreateRequest{Rootfs: rootfs, Cmd: []string{"sh"}}
		edit(&r)
		return r
	}
	tests := []struct {
		name string
		req  api.CreateRequest
		want string
	}{
		{"image and rootfs", good(func(r *api.CreateRequest) { r.Image = "alpine" }), "not both"},
		{"neither image nor rootfs", good(func(r *api.CreateRequest) { r.Rootfs = "" }), "an image or a rootfs directory is required"},
		{"relative rootfs", good(func(r *api.CreateRequest) { r.Rootfs = "rootfs" }), "must be absolute"},
		{"rootfs without cmd", good(func(r *api.CreateRequest) { r.Cmd = nil }), "no command given"},
		{"negative cpus", good(func(r *api.CreateRequest) { r.CPUs = -1 }), "cpus must be positive"},
		{"label with empty key", good(func(r *api.CreateRequest) { r.Labels = map[string]string{"": "v"} }), "a label needs a key"},
		{"ports with network none", good(func(r *api.CreateRequest) { r.Network, r.Ports = NetworkNone, []string{"8080:80"} }), "network user only"},
		{"bad port", good(func(r *api.CreateRequest) { r.Ports = []string{"eighty"} }), `port "eighty"`},
		{"relative volume host path", good(func(r *api.CreateRequest) { r.Volumes = []string{"data:/data"} }), "host path must be absolute"},
		{"volume without box path", good(func(r *api.CreateRequest) { r.Volumes = []string{rootfs} }), "HOSTPATH:BOXPATH"},
		{"bad health interval", good(func(r *api.CreateRequest) { r.HealthCheck = &api.HealthCheck{Interval: "often"} }), "health_check.interval"},
		{"bad health timeout", good(func(r *api.CreateRequest) { r.HealthCheck = &api.HealthCheck{Timeout: "1"} }), "health_check.timeout"},
		{"bad health retries", good(func(r *api.CreateRequest) { r.HealthCheck = &api.HealthCheck{Retries: -1} }), "health_check.retries"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := CreateOptionsFromRequest(tt.req)
			if err == nil {
				t.Fatalf("accepted: %+v", o)
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q (invalid argument: %v), want an invalid argument naming %q", err, errdefs.IsInvalidArgument(err), tt.want)
			}
		})
	}
}

func TestCreateOptionsFromRequestCarriesAGoodRequest(t *testing.T) {
	rootfs, vol := t.TempDir(), t.TempDir()
	req := api.CreateRequest{
		Rootfs: rootfs, Cmd: []string{"sh", "-c", "true"}, Env: []string{"A=1"}, Cwd: "/w", User: "1:2",
		Memory: 1 << 20, CPUs: 1.5, Ports: []string{"8080:80", "127.0.0.1:53:53/udp"},
		Volumes: []string{vol + ":/data:ro"}, AutoRemove: true, Name: "web",
		Labels: map[string]string{"app": "web", "tier": ""}, TTY: true, OpenStdin: true,
	}
	o, err := CreateOptionsFromRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	if o.ID == "" || o.Name != "web" || !o.AutoRemove || !o.OpenStdin || !maps.Equal(o.Labels, req.Labels) {
		t.Errorf("options: %+v", o)
	}
	s := o.Spec
	if s.Rootfs != rootfs || strings.Join(s.Args, " ") != "sh -c true" || s.Env[0] != "A=1" || s.Cwd != "/w" || s.User != "1:2" ||
		s.MemoryBytes != 1<<20 || s.CPUs != 1.5 || !s.Terminal || s.Network != NetworkUser || len(s.Ports) != 2 {
		t.Errorf("spec: %+v", s)
	}
	if len(s.Volumes) != 1 || s.Volumes[0] != (Volume{Source: vol, Destination: "/data", ReadOnly: true}) {
		t.Errorf("volumes: %+v", s.Volumes)
	}
	if len(s.Annotations) != 0 {
		t.Errorf("health annotations %v without health settings, want none (the shim's defaults)", s.Annotations)
	}
	// The options do not share the request's label map.
	req.Labels["app"] = "changed"
	if o.Labels["app"] != "web" {
		t.Error("the options share the request's labels")
	}
	if o2, err := CreateOptionsFromRequest(req); err != nil || o2.ID == o.ID {
		t.Errorf("a second request got id %q (%v), the first %q: want a new one", o2.ID, err, o.ID)
	}
}

// An image brings its own command: a request naming one needs none.
func TestCreateOptionsFromRequestTakesAnImageWithoutACommand(t *testing.T) {
	o, err := CreateOptionsFromRequest(api.CreateRequest{Image: "busybox"})
	if err != nil {
		t.Fatal(err)
	}
	if o.Image != "busybox" || o.Spec.Rootfs != "" || len(o.Spec.Args) != 0 {
		t.Errorf("options: image %q, rootfs %q, args %q", o.Image, o.Spec.Rootfs, o.Spec.Args)
	}
}

func TestCreateOptionsFromRequestNetworkDefaultsToUser(t *testing.T) {
	for _, network := range []string{"", NetworkUser, NetworkNone, "netns:/run/netns/x"} {
		o, err := CreateOptionsFromRequest(api.CreateRequest{Rootfs: t.TempDir(), Cmd: []string{"sh"}, Network: network})
		if err != nil {
			t.Fatalf("network %q: %v", network, err)
		}
		if want := cmp.Or(network, NetworkUser); o.Spec.Network != want {
			t.Errorf("network %q: got %q, want %q", network, o.Spec.Network, want)
		}
	}
}

// The three states of health_check_disabled: true turns checks off whatever
// else is set; false and absent keep the defaults, tuned by custom settings
// that travel intact.
func TestHealthSettingsBecomeAnnotations(t *testing.T) {
	yes, no := true, false
	custom := &api.HealthCheck{Interval: "5s", Timeout: "2s", StartPeriod: "0s", Retries: 7}
	customAnn := map[string]string{
		health.AnnotationInterval: "5s", health.AnnotationTimeout: "2s",
		health.AnnotationStartPeriod: "0s", health.AnnotationRetries: "7",
	}
	tests := []struct {
		name     string
		disabled *bool
		check    *api.HealthCheck
		want     map[string]string
	}{
		{"absent: default", nil, nil, map[string]string{}},
		{"false: default", &no, nil, map[string]string{}},
		{"true: disabled", &yes, nil, map[string]string{health.AnnotationDisabled: "true"}},
		{"true wins over custom settings", &yes, custom, map[string]string{health.AnnotationDisabled: "true"}},
		{"false with custom settings", &no, custom, customAnn},
		{"absent with custom settings", nil, custom, customAnn},
		{"empty settings: default", nil, &api.HealthCheck{}, map[string]string{}},
		{"one setting", nil, &api.HealthCheck{Interval: "1m"}, map[string]string{health.AnnotationInterval: "1m"}},
		{"retries only", nil, &api.HealthCheck{Retries: 1}, map[string]string{health.AnnotationRetries: "1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := api.CreateRequest{Rootfs: t.TempDir(), Cmd: []string{"sh"}, HealthCheckDisabled: tt.disabled, HealthCheck: tt.check}
			o, err := CreateOptionsFromRequest(req)
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(o.Spec.Annotations, tt.want) {
				t.Errorf("annotations %v, want %v", o.Spec.Annotations, tt.want)
			}
			// What the shim reads back is what was asked for.
			var opts health.Options
			for k, v := range o.Spec.Annotations {
				if err := opts.Set(k, v, k); err != nil {
					t.Errorf("the shim would refuse %s=%q: %v", k, v, err)
				}
			}
		})
	}
}

func TestHealthSettingsAreValidatedAsTheShimReadsThem(t *testing.T) {
	_, err := healthAnnotations(nil, &api.HealthCheck{Interval: "soon"})
	if err == nil || !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "health_check.interval") {
		t.Fatalf("bad interval: %v, want an invalid argument naming health_check.interval", err)
	}
	// A bad setting does not matter when checks are disabled.
	yes := true
	if ann, err := healthAnnotations(&yes, &api.HealthCheck{Interval: "soon"}); err != nil || ann[health.AnnotationDisabled] != "true" {
		t.Fatalf("disabled with a bad interval: %v, %v", ann, err)
	}
}
