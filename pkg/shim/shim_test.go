package shim

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/api/types"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/health"
)

func TestProcessTransitionsAreExplicit(t *testing.T) {
	p := newProcess("box", "", stdioConfig{}, nil)
	if err := p.transition("delete", stateDeleted, stateStopped); !errdefs.IsFailedPrecondition(err) ||
		!strings.Contains(err.Error(), "cannot delete box in created state") {
		t.Fatalf("delete of a created process that must be stopped: %v", err)
	}
	if err := p.transition("start", stateRunning, stateCreated); err != nil {
		t.Fatal(err)
	}
	if err := p.transition("start", stateRunning, stateCreated); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("second start: %v", err)
	}
	if !p.setExited(exitInfo{status: 3, at: time.Unix(1, 0)}) {
		t.Fatal("first exit not recorded")
	}
	if p.setExited(exitInfo{status: 137}) {
		t.Fatal("second exit overwrote the first")
	}
	st, e := p.current()
	if st != stateStopped || e.status != 3 {
		t.Fatalf("state %v exit %+v; want stopped with 3", st, e)
	}
}

func TestWaitReturnsTheRecordedExitToEveryCaller(t *testing.T) {
	p := newProcess("box", "e1", stdioConfig{}, nil)
	results := make(chan exitInfo, 3)
	for i := 0; i < 3; i++ {
		go func() {
			e, _ := p.wait(context.Background())
			results <- e
		}()
	}
	p.setExited(exitInfo{status: 143, at: time.Now()})
	for i := 0; i < 3; i++ {
		select {
		case e := <-results:
			if e.status != 143 {
				t.Fatalf("waiter got %d", e.status)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("waiter not released")
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	q := newProcess("box", "e2", stdioConfig{}, nil)
	if _, err := q.wait(ctx); err == nil {
		t.Fatal("wait ignored its context")
	}
}

func TestParseVMOptions(t *testing.T) {
	tests := []struct {
		name string
		ann  map[string]string
		want vmOptions
		bad  string
	}{
		{"none", nil, vmOptions{}, ""},
		{"all", map[string]string{AnnotationVCPUs: "2", AnnotationMemory: "512", AnnotationAccel: "tcg",
			AnnotationKernel: "/k", AnnotationInitrd: "/i", AnnotationBootTimeout: "90s"},
			vmOptions{vcpus: 2, memoryMiB: 512, accel: "tcg", kernel: "/k", initrd: "/i", bootTimeout: 90 * time.Second}, ""},
		{"vcpus zero", map[string]string{AnnotationVCPUs: "0"}, vmOptions{}, AnnotationVCPUs},
		{"vcpus text", map[string]string{AnnotationVCPUs: "two"}, vmOptions{}, AnnotationVCPUs},
		{"memory too small", map[string]string{AnnotationMemory: "8"}, vmOptions{}, AnnotationMemory},
		{"unknown accel", map[string]string{AnnotationAccel: "hvf"}, vmOptions{}, AnnotationAccel},
		{"bad timeout", map[string]string{AnnotationBootTimeout: "-1s"}, vmOptions{}, AnnotationBootTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVMOptions(&specs.Spec{Annotations: tt.ann}, nil)
			if tt.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.bad) {
					t.Fatalf("err = %v; want invalid argument naming %s", err, tt.bad)
				}
				return
			}
			if tt.want.health == (health.Options{}) {
				tt.want.health = health.DefaultOptions()
				tt.want.templates = true
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestReadSpecRejectsBadBundles(t *testing.T) {
	tests := []struct {
		name, config, want string
	}{
		{"missing", "", "bundle spec"},
		{"garbage", "{not json", "not a valid OCI spec"},
		{"no process", `{"root": {"path": "rootfs"}}`, "no process to run"},
		{"no args", `{"process": {"cwd": "/"}, "root": {"path": "rootfs"}}`, "no process to run"},
		{"no root", `{"process": {"args": ["sh"]}}`, "no root.path"},
		{"too big", `{"x": "` + strings.Repeat("a", maxSpecFile) + `"}`, "exceeds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.config != "" {
				os.WriteFile(filepath.Join(dir, "config.json"), []byte(tt.config), 0o644)
			}
			_, _, err := readSpec(dir)
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v; want invalid argument mentioning %q", err, tt.want)
			}
		})
	}
}

func TestPrepareRootfsChecksTheSpecRoot(t *testing.T) {
	bundle := t.TempDir()
	os.Mkdir(filepath.Join(bundle, "rootfs"), 0o755)
	os.WriteFile(filepath.Join(bundle, "file"), nil, 0o644)
	tests := []struct {
		root, want string
		bad        bool
	}{
		{root: "rootfs", want: filepath.Join(bundle, "rootfs")},
		{root: filepath.Join(bundle, "rootfs"), want: filepath.Join(bundle, "rootfs")},
		{root: "missing", bad: true},
		{root: "file", bad: true},
	}
	for _, tt := range tests {
		got, mounted, err := prepareRootfs(bundle, &specs.Spec{Root: &specs.Root{Path: tt.root}}, []*types.Mount(nil))
		if tt.bad {
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("root %s: err = %v; want invalid argument", tt.root, err)
			}
			continue
		}
		if err != nil || got != tt.want || mounted {
			t.Errorf("root %s: %s, %v, %v", tt.root, got, mounted, err)
		}
	}
}

func TestBoxStateDirIsShortAndStable(t *testing.T) {
	long := strings.Repeat("x", 200)
	a, b := boxStateDir("k8s.io", long), boxStateDir("k8s.io", long)
	if a != b {
		t.Fatal("state dir not stable")
	}
	if boxStateDir("default", long) == a {
		t.Fatal("namespaces share a state dir")
	}
	// Room for "/qmp.sock" within sun_path (108).
	if len(a)+len("/agent.sock") >= 108 {
		t.Fatalf("state dir %s too long for unix sockets", a)
	}
}

func TestStdioURIsOfUnknownSchemesAreRejected(t *testing.T) {
	_, err := openRelay(context.Background(), stdioConfig{stdout: "ftp://host/x"}, "ns", "id")
	if err == nil || !strings.Contains(err.Error(), "unsupported stdio URI scheme") {
		t.Fatalf("err = %v", err)
	}
}

func TestFileURIReceivesBothStreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	r, err := openRelay(context.Background(), stdioConfig{stdout: "file://" + path, stderr: "file://" + path}, "ns", "id")
	if err != nil {
		t.Fatal(err)
	}
	r.stdout.Write([]byte("out\n"))
	r.stderr.Write([]byte("err\n"))
	r.close()
	data, _ := os.ReadFile(path)
	if string(data) != "out\nerr\n" {
		t.Fatalf("log file %q", data)
	}
}

func TestRuntimeOptionsAreDefaultsAnnotationsOverride(t *testing.T) {
	body := func(b string) *anypb.Any { return optionsBody(t, b) }
	missing := filepath.Join(t.TempDir(), "missing.toml")
	pathOpts, _ := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: missing})
	runcOpts, _ := typeurl.MarshalAnyToProto(&runcoptions.Options{BinaryName: "runc"})
	tests := []struct {
		name string
		opts *anypb.Any
		ann  map[string]string
		want vmOptions
		bad  string
	}{
		{"body", body("vcpus = 2\nmemory_mib = 512\nboot_timeout = \"30s\""), nil,
			vmOptions{vcpus: 2, memoryMiB: 512, bootTimeout: 30 * time.Second}, ""},
		{"annotation overrides", body("vcpus = 2"), map[string]string{AnnotationVCPUs: "4"}, vmOptions{vcpus: 4}, ""},
		{"unknown key", body("vcpu = 2"), nil, vmOptions{}, `unknown key "vcpu"`},
		{"bad value", body("accel = \"warp\""), nil, vmOptions{}, "runtime option accel"},
		{"not toml", body("vcpus = = 2"), nil, vmOptions{}, "runtime options"},
		{"missing file", pathOpts, nil, vmOptions{}, missing},
		{"runc's options type with a binary", runcOpts, nil, vmOptions{}, "binary_name runc"},
		{"another options type", anyOf(t, &runcoptions.CheckpointOptions{}), nil, vmOptions{}, "not boxlite's"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVMOptions(&specs.Spec{Annotations: tt.ann}, tt.opts)
			if tt.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.bad) {
					t.Fatalf("err = %v; want invalid argument mentioning %q", err, tt.bad)
				}
				return
			}
			if tt.want.health == (health.Options{}) {
				tt.want.health = health.DefaultOptions()
				tt.want.templates = true
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// A container's memory limit and CPU quota size its VM, never below the
// default; the annotations still set exact sizes.
func TestVMIsSizedToFitTheLimits(t *testing.T) {
	body := func(b string) *anypb.Any { return optionsBody(t, b) }
	pod := func(ann map[string]string) map[string]string {
		ann[annotationContainerType] = containerTypeSandbox
		return ann
	}
	res := func(mem int64, quota int64, period uint64) *specs.Linux {
		r := &specs.LinuxResources{}
		if mem != 0 {
			r.Memory = &specs.LinuxMemory{Limit: &mem}
		}
		if quota != 0 {
			r.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
		}
		return &specs.Linux{Resources: r}
	}
	tests := []struct {
		name  string
		linux *specs.Linux
		opts  *anypb.Any
		ann   map[string]string
		want  vmOptions
	}{
		{"no limits", nil, nil, nil, vmOptions{}},
		{"limit fits the default VM", res(128<<20, 0, 0), nil, nil, vmOptions{}},
		{"1 GiB limit", res(1<<30, 0, 0), nil, nil, vmOptions{memoryMiB: 1024 + guestOverheadMiB}},
		{"unaligned limit rounds up", res(500_000_000, 0, 0), nil, nil, vmOptions{memoryMiB: 477 + guestOverheadMiB}},
		{"runtime default is bigger", res(300<<20, 0, 0), body("memory_mib = 1024"), nil, vmOptions{memoryMiB: 1024}},
		{"runtime default is smaller", res(300<<20, 0, 0), body("memory_mib = 128"), nil, vmOptions{memoryMiB: 300 + guestOverheadMiB}},
		{"1.5 cpus", res(0, 150000, 100000), nil, nil, vmOptions{vcpus: 2}},
		{"half a cpu", res(0, 50000, 100000), nil, nil, vmOptions{}},
		{"quota capped", res(0, 1000*100000, 100000), nil, nil, vmOptions{vcpus: 64}},
		{"annotations win", res(1<<30, 400000, 100000), nil,
			map[string]string{AnnotationMemory: "512", AnnotationVCPUs: "1"}, vmOptions{memoryMiB: 512, vcpus: 1}},
		{"pod totals size the pod's VM", res(0, 0, 0), nil, pod(map[string]string{annotationSandboxMemory: "1073741824",
			annotationSandboxCPUQuota: "250000", annotationSandboxCPUPeriod: "100000"}), vmOptions{memoryMiB: 1024 + guestOverheadMiB, vcpus: 3}},
		{"small pod keeps the defaults", res(0, 0, 0), nil, pod(map[string]string{annotationSandboxMemory: "67108864"}), vmOptions{}},
		{"pod totals only for the sandbox", nil, nil, map[string]string{annotationContainerType: containerTypeContainer,
			annotationSandboxMemory: "1073741824"}, vmOptions{}},
		{"annotations win over pod totals", nil, nil, pod(map[string]string{annotationSandboxMemory: "1073741824",
			AnnotationMemory: "300"}), vmOptions{memoryMiB: 300}},
		{"bad pod totals are ignored", nil, nil, pod(map[string]string{annotationSandboxMemory: "lots",
			annotationSandboxCPUQuota: "-1", annotationSandboxCPUPeriod: "100000"}), vmOptions{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVMOptions(&specs.Spec{Linux: tt.linux, Annotations: tt.ann}, tt.opts)
			if tt.want.health == (health.Options{}) {
				tt.want.health = health.DefaultOptions()
				tt.want.templates = true
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// Health settings come from the runtime options and the annotations like
// the VM's; custom values travel intact, a bad one is an error naming it.
func TestHealthOptions(t *testing.T) {
	body := func(b string) *anypb.Any { return optionsBody(t, b) }
	custom := health.DefaultOptions()
	custom.Interval, custom.Retries = 5*time.Second, 7
	off := health.DefaultOptions()
	off.Disabled = true
	tests := []struct {
		name string
		opts *anypb.Any
		ann  map[string]string
		want health.Options
		bad  string
	}{
		{"defaults", nil, nil, health.DefaultOptions(), ""},
		{"annotations", nil, map[string]string{health.AnnotationInterval: "5s", health.AnnotationRetries: "7"}, custom, ""},
		{"runtime options", body("health_interval = \"5s\"\nhealth_retries = 7"), nil, custom, ""},
		{"disabled by annotation", nil, map[string]string{health.AnnotationDisabled: "true"}, off, ""},
		{"false is the default", nil, map[string]string{health.AnnotationDisabled: "false"}, health.DefaultOptions(), ""},
		{"annotation re-enables", body("health_disabled = true"), map[string]string{health.AnnotationDisabled: "false"}, health.DefaultOptions(), ""},
		{"bad interval", nil, map[string]string{health.AnnotationInterval: "often"}, health.Options{}, health.AnnotationInterval},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVMOptions(&specs.Spec{Annotations: tt.ann}, tt.opts)
			if tt.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tt.bad) {
					t.Fatalf("err = %v; want invalid argument naming %q", err, tt.bad)
				}
				return
			}
			if err != nil || got.health != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got.health, err, tt.want)
			}
		})
	}
}

// optionsBody is runtime options holding the TOML body b.
func optionsBody(t *testing.T, b string) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigBody: []byte(b)})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// containerd's CRI offers recursive read-only mounts to a runtime whose
// Info lists "rro" among its features' mount options.
func TestInfoAdvertisesTheFeatures(t *testing.T) {
	info, err := NewManager("io.containerd.boxlite.v1").Info(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(info.Features)
	if err != nil {
		t.Fatalf("features do not decode: %v", err)
	}
	f, ok := v.(*features.Features)
	if !ok || !slices.Contains(f.MountOptions, "rro") || !slices.Contains(f.Hooks, hookCreateRuntime) {
		t.Fatalf("features %+v; want rro and the host-run hooks", v)
	}
}

// TestTemplatesOption: templates are on by default, off by annotation,
// runtime option or $BOXLITE_TEMPLATES=off, and a bad value is an error.
func TestTemplatesOption(t *testing.T) {
	spec := func(v string) *specs.Spec {
		s := &specs.Spec{Annotations: map[string]string{}}
		if v != "" {
			s.Annotations[AnnotationTemplates] = v
		}
		return s
	}
	for _, tc := range []struct {
		name, env, ann string
		want           bool
		err            bool
	}{
		{"default", "", "", true, false},
		{"annotation off", "", "false", false, false},
		{"env off", "off", "", false, false},
		{"env off, annotation on", "off", "true", true, false},
		{"bad annotation", "", "maybe", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(TemplatesEnv, tc.env)
			o, err := parseVMOptions(spec(tc.ann), nil)
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if err == nil && o.templates != tc.want {
				t.Errorf("templates = %v, want %v", o.templates, tc.want)
			}
		})
	}
}
