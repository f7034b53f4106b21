package shim

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/cgrouptest"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/reaper"
)

func anyOf(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// runc's options type, as containerd's client helpers send it: the fields
// a box honours reach the container, the runc-only ones are accepted and
// ignored, and the ones whose loss would go unnoticed are refused by name.
func TestRuncOptionsAreHonouredIgnoredOrRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts *runcoptions.Options
		want taskOptions
		bad  string
	}{
		{"honoured", &runcoptions.Options{ShimCgroup: "/a", IoUid: 1000, IoGid: 1001, NoNewKeyring: true, NoPivotRoot: true},
			taskOptions{noNewKeyring: true, noPivotRoot: true}, ""},
		{"stdio owner", &runcoptions.Options{IoUid: 7}, taskOptions{}, ""},
		{"runc-only fields", &runcoptions.Options{Root: "/run/containerd/runc", SystemdCgroup: true, CriuImagePath: "/i", CriuWorkPath: "/w"},
			taskOptions{}, ""},
		{"binary name", &runcoptions.Options{BinaryName: "/usr/bin/crun"}, taskOptions{}, "binary_name /usr/bin/crun"},
		{"task API address", &runcoptions.Options{TaskApiAddress: "unix:///run/x.sock", TaskApiVersion: 3}, taskOptions{}, "task_api_address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := anyOf(t, tc.opts)
			got, err := parseTaskOptions(a)
			_, vmErr := parseVMOptions(&specs.Spec{}, a)
			if tc.bad != "" {
				for _, err := range []error{err, vmErr} {
					if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.bad) {
						t.Fatalf("err = %v; want invalid argument naming %q", err, tc.bad)
					}
				}
				return
			}
			if err != nil || vmErr != nil {
				t.Fatalf("parseTaskOptions: %v, parseVMOptions: %v", err, vmErr)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	// boxlite's own options type carries no container settings.
	if got, err := parseTaskOptions(anyOf(t, &runtimeoptions.Options{ConfigBody: []byte("vcpus = 2")})); err != nil || got != (taskOptions{}) {
		t.Errorf("boxlite's options: %+v, %v", got, err)
	}
}

func TestUpdateRefusesMemoryTheVMCannotHold(t *testing.T) {
	sb := &sandbox{memoryMiB: 256}
	mib := func(n int64) *int64 { n <<= 20; return &n }
	unlimited := int64(-1)
	for _, tc := range []struct {
		name string
		res  *specs.LinuxResources
		bad  string
	}{
		{"no memory", &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "0"}}, ""},
		{"fits", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: mib(192)}}, ""},
		{"unlimited", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &unlimited}}, ""},
		{"too big", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: mib(193)}}, "memory limit of 193 MiB exceeds what the box's VM can hold: 192 MiB of its 256 MiB"},
		{"reservation too big", &specs.LinuxResources{Memory: &specs.LinuxMemory{Reservation: mib(512)}}, "memory reservation of 512 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := sb.fits(tc.res)
			if tc.bad == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), tc.bad) || !strings.Contains(err.Error(), AnnotationMemory) {
				t.Fatalf("err = %v; want failed precondition saying %q and naming %s", err, tc.bad, AnnotationMemory)
			}
		})
	}
}

func TestUpdateResourcesMustBeLinuxResources(t *testing.T) {
	if _, err := decodeResources(nil); !errdefs.IsInvalidArgument(err) {
		t.Errorf("no resources: %v", err)
	}
	if _, err := decodeResources(anyOf(t, &runtimeoptions.Options{})); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "LinuxResources") {
		t.Errorf("wrong type: %v", err)
	}
	if _, err := decodeResources(&anypb.Any{TypeUrl: "types.containerd.io/nothing", Value: []byte("x")}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("unknown type: %v", err)
	}
	want := &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: new(uint64)}}
	a, err := typeurl.MarshalAny(want)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeResources(&anypb.Any{TypeUrl: a.GetTypeUrl(), Value: a.GetValue()})
	if err != nil || got.CPU == nil || got.CPU.Shares == nil {
		t.Errorf("LinuxResources: %+v, %v", got, err)
	}
}

// sleeper starts `sleep 60` under the reaper and kills it at the end.
func sleeper(t *testing.T) *reaper.Process {
	t.Helper()
	p, err := reaper.Default().Start(exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Signal(9)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.Wait(ctx)
	})
	return p
}

func bootstrapWith(t *testing.T, o *runcoptions.Options) *bootapi.BootstrapParams {
	t.Helper()
	params := &bootapi.BootstrapParams{InstanceID: "x"}
	if err := params.AddExtension(o); err != nil {
		t.Fatal(err)
	}
	return params
}

// The runc shim's Start moves the new shim into ShimCgroup; so does ours.
// Verified two-sided: with addToCgroup a no-op, this test and the next
// fail (the process stays in the test's cgroup; the missing cgroup goes
// unnoticed and the shim keeps running).
func TestShimJoinsTheShimCgroupOfItsOptions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("moving a process between cgroups needs root: run go test as root")
	}
	path := cgrouptest.New(t, "boxlite-test-shim")
	// Killed and reaped (sleeper's cleanup) before the cgroup goes.
	p := sleeper(t)
	if err := joinShimCgroup(t.Context(), bootstrapWith(t, &runcoptions.Options{ShimCgroup: path}), p); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), ":"+path+"\n") {
		t.Fatalf("shim not in %s:\n%s", path, data)
	}
}

// A cgroup that does not exist fails Start, and the shim it started is
// killed and reaped, not left running outside its cgroup.
func TestShimInAMissingCgroupIsKilled(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to read every process's cgroup: run go test as root")
	}
	p := sleeper(t)
	err := joinShimCgroup(t.Context(), bootstrapWith(t, &runcoptions.Options{ShimCgroup: "/boxlite-test-no-such-cgroup"}), p)
	if err == nil || !strings.Contains(err.Error(), "boxlite-test-no-such-cgroup") {
		t.Fatalf("err = %v; want it to name the cgroup", err)
	}
	select {
	case <-p.Done():
	default:
		t.Fatal("the shim still runs after its cgroup move failed")
	}
}

// No runc options, or none naming a cgroup, leave the shim where it is.
func TestShimWithoutShimCgroupStays(t *testing.T) {
	p := sleeper(t)
	for _, params := range []*bootapi.BootstrapParams{{InstanceID: "x"}, bootstrapWith(t, &runcoptions.Options{IoUid: 5})} {
		if err := joinShimCgroup(t.Context(), params, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Signal(0); err != nil {
		t.Fatalf("the shim was touched: %v", err)
	}
}
