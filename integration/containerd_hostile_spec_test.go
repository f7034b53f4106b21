package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// editSpec is a spec option from a function.
func editSpec(fn func(*specs.Spec)) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		fn(s)
		return nil
	}
}

// TestContainerdHostileSpecs gives runc (the baseline) and boxlite specs a
// hostile or careless client could send (fault matrix row 13): a 10 MiB
// spec, a mount whose destination climbs out of the rootfs, an absurd
// rlimit. Each either runs as runc runs it (the mount stays inside the
// rootfs) or fails with a clear error; either way nothing is left (the
// harness's leak checks, and no task, container or shim).
func TestContainerdHostileSpecs(t *testing.T) {
	c := startContainerd(t)
	huge := strings.Repeat("x", 10<<20)
	cases := []struct {
		name string
		opts []oci.SpecOpts
		args []string
		// boxliteErr, when set, is what boxlite's error must say (runc
		// may run it). Empty: boxlite must do as runc does.
		boxliteErr string
	}{
		{"10MiB-spec", []oci.SpecOpts{oci.WithAnnotations(map[string]string{"huge": huge})}, []string{"true"}, "exceeds"},
		{"mount-climbs-out", []oci.SpecOpts{editSpec(func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/../../../../../escape", Type: "tmpfs", Source: "tmpfs"})
		})}, []string{"sh", "-c", "test -d /escape && echo inside"}, ""},
		{"absurd-rlimit", []oci.SpecOpts{editSpec(func(s *specs.Spec) {
			s.Process.Rlimits = append(s.Process.Rlimits, specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Hard: 1 << 62, Soft: 1 << 62})
		})}, []string{"true"}, ""},
		{"unknown-rlimit", []oci.SpecOpts{editSpec(func(s *specs.Spec) {
			s.Process.Rlimits = append(s.Process.Rlimits, specs.POSIXRlimit{Type: "RLIMIT_BOGUS", Hard: 1, Soft: 1})
		})}, []string{"true"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			results := map[string]string{}
			for _, rt := range []string{runcRuntime, boxliteRuntime} {
				id := c.newID(t, shortRuntime(rt))
				out, err := c.runSpec(t, id, rt, tc.opts, tc.args)
				t.Logf("%s: output %q, error %v", shortRuntime(rt), out, err)
				switch {
				case rt == boxliteRuntime && tc.boxliteErr != "":
					if err == nil || !strings.Contains(err.Error(), tc.boxliteErr) {
						t.Errorf("boxlite: %v; want an error saying %q", err, tc.boxliteErr)
					}
				case err != nil:
					results[rt] = "error"
				default:
					results[rt] = out
				}
				c.assertNothingHalfCreated(t, id, false)
			}
			if tc.boxliteErr == "" && results[runcRuntime] != results[boxliteRuntime] {
				t.Errorf("runc gave %q, boxlite %q", results[runcRuntime], results[boxliteRuntime])
			}
		})
	}
}

// runSpec runs args in a container of testImage under rt with extra spec
// options, through the Go client, and removes it: the output, or the first
// error (creating, starting or a non-zero exit).
func (c *containerd) runSpec(t testing.TB, id, rt string, opts []oci.SpecOpts, args []string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(nsCtx(context.Background()), 3*time.Minute)
	defer cancel()
	cl := c.goClient(t)
	img, err := cl.GetImage(ctx, testImage)
	if err != nil {
		t.Fatal(err)
	}
	specOpts := append([]oci.SpecOpts{oci.WithImageConfig(img), oci.WithProcessArgs(args...)}, opts...)
	ctr, err := cl.NewContainer(ctx, id, client.WithImage(img), client.WithNewSnapshot(id, img),
		client.WithRuntime(rt, c.plainOptions(rt)), client.WithNewSpec(specOpts...))
	if err != nil {
		return "", err
	}
	defer ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)
	var out syncBuffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &out, &out)))
	if err != nil {
		return "", err
	}
	defer c.deleteTask(t, task)
	exitC, err := task.Wait(ctx)
	if err != nil {
		return "", err
	}
	if err := task.Start(ctx); err != nil {
		return "", err
	}
	st := <-exitC
	code, _, err := st.Result()
	if err != nil {
		return "", err
	}
	if code != 0 {
		return "", fmt.Errorf("exit %d: %s", code, strings.TrimSpace(out.String()))
	}
	return strings.TrimSpace(out.String()), nil
}
