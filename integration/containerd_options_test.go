package integration

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
)

// vmShape is what a box reports as its vCPUs and memory.
const vmShape = "nproc; grep MemTotal /proc/meminfo"

// parseShape reads vmShape's output: vCPUs and MemTotal in MiB.
func parseShape(t testing.TB, out string) (vcpus, memMiB int) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("unexpected output %q", out)
	}
	vcpus, _ = strconv.Atoi(lines[0])
	f := strings.Fields(lines[1])
	kib, _ := strconv.Atoi(f[len(f)-2])
	return vcpus, kib >> 10
}

// closeTo says whether a guest's MemTotal fits a VM of want MiB (the
// kernel keeps some for itself).
func closeTo(gotMiB, wantMiB int) bool {
	return gotMiB <= wantMiB && gotMiB > wantMiB*3/4
}

// TestContainerdAnnotationsSizeTheVM passes io.boxlite.* annotations with
// `ctr run --annotation`: the guest sees the vCPUs and memory asked for.
func TestContainerdAnnotationsSizeTheVM(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, []string{"--annotation", "io.boxlite.vcpus=2", "--annotation", "io.boxlite.memory_mib=512"},
		"sh", "-c", vmShape)
	if r.code != 0 {
		t.Fatalf("exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	if vcpus, mem := parseShape(t, r.stdout); vcpus != 2 || !closeTo(mem, 512) {
		t.Errorf("box has %d vCPUs and %d MiB, want 2 and about 512", vcpus, mem)
	}
}

// TestContainerdLimitsSizeTheVM: a container's limits (ctr --memory-limit,
// --cpus; nerdctl and Kubernetes set the same spec fields) grow its VM so
// they can be reached, as with Kata. Verified two-sided: before the shim
// sized the VM from the spec, the box had 1 vCPU and about 256 MiB.
func TestContainerdLimitsSizeTheVM(t *testing.T) {
	c := startContainerd(t)
	r := c.runRm(t, boxliteRuntime, []string{"--memory-limit", strconv.Itoa(512 << 20), "--cpus", "1.5"}, "sh", "-c", vmShape)
	if r.code != 0 {
		t.Fatalf("exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	if vcpus, mem := parseShape(t, r.stdout); vcpus != 2 || !closeTo(mem, 512+64) {
		t.Errorf("box has %d vCPUs and %d MiB, want 2 and about %d", vcpus, mem, 512+64)
	}
}

// TestContainerdRuntimeOptionsSetTheVMDefaults gives the runtime its options
// the two ways containerd delivers them: a config file (ctr
// --runtime-config-path), and a TOML body (what the CRI plugin sends from the
// runtime's options table). They size the VM; an annotation overrides them.
func TestContainerdRuntimeOptionsSetTheVMDefaults(t *testing.T) {
	c := startContainerd(t)
	cfg := filepath.Join(c.dir, "boxlite-runtime.toml")
	if err := os.WriteFile(cfg, []byte("vcpus = 2\nmemory_mib = 384\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := c.runRm(t, boxliteRuntime, []string{"--runtime-config-path", cfg}, "sh", "-c", vmShape)
	if r.code != 0 {
		t.Fatalf("config file: exit %d stderr %q", r.code, r.stderr)
	}
	if vcpus, mem := parseShape(t, r.stdout); vcpus != 2 || !closeTo(mem, 384) {
		t.Errorf("config file: box has %d vCPUs and %d MiB, want 2 and about 384", vcpus, mem)
	}
	r = c.runRm(t, boxliteRuntime, []string{"--runtime-config-path", cfg, "--annotation", "io.boxlite.memory_mib=512"}, "sh", "-c", vmShape)
	if r.code != 0 {
		t.Fatalf("config file and annotation: exit %d stderr %q", r.code, r.stderr)
	}
	if vcpus, mem := parseShape(t, r.stdout); vcpus != 2 || !closeTo(mem, 512) {
		t.Errorf("config file and annotation: box has %d vCPUs and %d MiB, want 2 and about 512", vcpus, mem)
	}

	// The CRI plugin's form: the options table as a TOML body.
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainer(t, id, boxliteRuntime, &runtimeoptions.Options{ConfigBody: []byte("memory_mib = 320\n")}, "sh", "-c", vmShape)
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	logf := filepath.Join(c.dir, id+".log")
	task, err := ctr.NewTask(ctx, cio.LogFile(logf))
	if err != nil {
		t.Fatalf("config body: new task: %v", err)
	}
	defer c.deleteTask(t, task)
	statusC, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-statusC:
		if st.ExitCode() != 0 {
			t.Fatalf("config body: exit %d", st.ExitCode())
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("config body: no exit within 2m")
	}
	out, _ := os.ReadFile(logf)
	if vcpus, mem := parseShape(t, string(out)); vcpus != 1 || !closeTo(mem, 320) {
		t.Errorf("config body: box has %d vCPUs and %d MiB, want 1 and about 320", vcpus, mem)
	}
}

// TestContainerdBadAnnotationFailsCleanly passes annotations the shim must
// refuse: ctr gets an error naming the annotation, and no task, shim or VM
// is left.
func TestContainerdBadAnnotationFailsCleanly(t *testing.T) {
	c := startContainerd(t)
	for _, a := range []string{"io.boxlite.vcpus=0", "io.boxlite.memory_mib=lots", "io.boxlite.accel=warp", "io.boxlite.kernel=/no/such/vmlinux"} {
		t.Run(a, func(t *testing.T) {
			id := c.newID(t, "bx")
			args := append(append([]string{"run", "--rm"}, c.runtimeFlags(boxliteRuntime)...), "--annotation", a, testImage, id, "true")
			r := c.ctr(t, args...)
			key, _, _ := strings.Cut(a, "=")
			t.Logf("exit %d: %s", r.code, strings.TrimSpace(r.stderr))
			if r.code == 0 {
				t.Errorf("run with %s succeeded", a)
			} else if !strings.Contains(r.stderr, key) && !strings.Contains(r.stderr, "/no/such/vmlinux") {
				t.Errorf("error %q does not name %s", r.stderr, key)
			}
			c.assertNothingHalfCreated(t, id, false)
		})
	}
}
