package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
)

// assertNothingHalfCreated checks that a failed run left no task, no
// container (ctr run --rm removes it) and no shim for id.
func (c *containerd) assertNothingHalfCreated(t testing.TB, id string, containerExpected bool) {
	t.Helper()
	if _, ok := c.taskList(t)[id]; ok {
		t.Errorf("task %s left after the failed run", id)
	}
	if ls := c.mustRun(t, "container", "ls", "-q"); strings.Contains(ls, id) != containerExpected {
		t.Errorf("container %s listed: %v, want %v", id, strings.Contains(ls, id), containerExpected)
	}
	deadline := time.Now().Add(settleTimeout)
	for {
		var left []string
		for _, p := range c.shims() {
			if strings.Contains(p.cmdline, " "+id+" ") || strings.HasSuffix(p.cmdline, " "+id) {
				left = append(left, p.String())
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("shim of %s left after the failed run:\n%s", id, strings.Join(left, "\n"))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestContainerdSpecTheGuestCannotRunFailsCleanly runs specs that cannot run,
// under runc (baseline) and boxlite: ctr fails with a message naming the
// problem, and no task, container, shim or VM is left.
func TestContainerdSpecTheGuestCannotRunFailsCleanly(t *testing.T) {
	c := startContainerd(t)
	cases := []struct {
		name  string
		image string
		flags []string
		args  []string
		// mention is a phrase the error must contain.
		mention string
	}{
		{"missing-binary", testImage, nil, []string{"/no/such/binary"}, "/no/such/binary"},
		{"cwd-is-a-file", testImage, []string{"--cwd", "/etc/passwd"}, []string{"true"}, "not a directory"},
		// ctr resolves user names in the image's /etc/passwd itself.
		{"unknown-user", testImage, []string{"--user", "nosuchuser"}, []string{"true"}, "no users found"},
		{"image-without-command", noCmdImage, nil, nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, rt := range []string{runcRuntime, boxliteRuntime} {
				id := c.newID(t, shortRuntime(rt))
				args := append(append(append([]string{"run", "--rm"}, c.runtimeFlags(rt)...), tc.flags...), tc.image, id)
				r := c.ctr(t, append(args, tc.args...)...)
				msg := strings.TrimSpace(r.stderr)
				t.Logf("%s: exit %d: %s", rt, r.code, msg)
				if r.code == 0 || msg == "" {
					t.Errorf("%s: exit %d stderr %q, want a failure with a message", rt, r.code, msg)
				}
				if tc.mention != "" && !strings.Contains(strings.ToLower(msg), tc.mention) {
					t.Errorf("%s: message %q does not mention %q", rt, msg, tc.mention)
				}
				c.assertNothingHalfCreated(t, id, false)
			}
		})
	}
}

// plainOptions are the runtime options of a container of runtime rt that
// needs nothing special: runc's state under the test's directory; none for
// boxlite.
func (c *containerd) plainOptions(rt string) any {
	if rt == runcRuntime {
		return &runcoptions.Options{Root: filepath.Join(c.dir, "runc")}
	}
	return nil
}

// newContainer creates a container of testImage running args with the Go
// client, for what ctr cannot express.
func (c *containerd) newContainer(t testing.TB, id, runtime string, runtimeOpts any, args ...string) client.Container {
	t.Helper()
	ctx := nsCtx(context.Background())
	cl := c.goClient(t)
	img, err := cl.GetImage(ctx, testImage)
	if err != nil {
		t.Fatal(err)
	}
	ctr, err := cl.NewContainer(ctx, id, client.WithImage(img), client.WithNewSnapshot(id, img),
		client.WithRuntime(runtime, runtimeOpts), client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs(args...)))
	if err != nil {
		t.Fatalf("new container %s: %v", id, err)
	}
	return ctr
}

// TestContainerdRejectsUnknownRuntimeOptions gives boxlite runtime options it
// cannot honour: a runtime config file that does not exist, one with an
// unknown key or a bad value (ctr --runtime-config-path), and the runc
// shim's options type. Each must fail task creation with a message naming
// the problem, leaving nothing behind.
func TestContainerdRejectsUnknownRuntimeOptions(t *testing.T) {
	c := startContainerd(t)
	files := []struct {
		name, body, mention string
	}{
		{"missing-config-path", "", "no-such-boxlite.toml"},
		{"unknown-key", "vcpus = 1\ncpus = 2\n", `"cpus"`},
		{"bad-value", "vcpus = 0\n", "vcpus"},
		{"not-toml", "vcpus: 2\n", "runtime options"},
	}
	for _, f := range files {
		t.Run(f.name, func(t *testing.T) {
			id := c.newID(t, "bx")
			path := filepath.Join(c.dir, "no-such-boxlite.toml")
			if f.body != "" {
				path = filepath.Join(c.dir, f.name+".toml")
				if err := os.WriteFile(path, []byte(f.body), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			args := append(append([]string{"run", "--rm"}, c.runtimeFlags(boxliteRuntime)...),
				"--runtime-config-path", path, testImage, id, "echo", "ran")
			r := c.ctr(t, args...)
			t.Logf("exit %d: %s", r.code, strings.TrimSpace(r.stderr))
			if r.code == 0 || !strings.Contains(r.stderr, f.mention) {
				t.Errorf("exit %d stdout %q stderr %q: want a failure mentioning %s", r.code, r.stdout, r.stderr, f.mention)
			}
			c.assertNothingHalfCreated(t, id, false)
		})
	}
	t.Run("runc-options-type", func(t *testing.T) {
		id := c.newID(t, "bx")
		ctx := nsCtx(context.Background())
		ctr := c.newContainer(t, id, boxliteRuntime, &runcoptions.Options{BinaryName: "/no/such/runc", SystemdCgroup: true}, "true")
		defer ctr.Delete(ctx, client.WithSnapshotCleanup)
		task, err := ctr.NewTask(ctx, cio.NullIO)
		if err == nil {
			t.Errorf("task created with the runc shim's options type; want an error about the runtime options")
			// Run it to its end ("true") so it can be deleted.
			if statusC, err := task.Wait(ctx); err == nil && task.Start(ctx) == nil {
				select {
				case <-statusC:
				case <-time.After(time.Minute):
				}
			}
			c.deleteTask(t, task)
			return
		} else {
			t.Logf("error: %v", err)
			if !strings.Contains(strings.ToLower(err.Error()), "option") {
				t.Errorf("error %q does not mention the options", err)
			}
		}
		c.assertNothingHalfCreated(t, id, true)
	})
}

// deleteTask deletes a task created by the Go client (created tasks can be
// deleted as they are), killing it first if it runs.
func (c *containerd) deleteTask(t testing.TB, task client.Task) {
	t.Helper()
	ctx, cancel := context.WithTimeout(nsCtx(context.Background()), 20*time.Second)
	defer cancel()
	_, err := task.Delete(ctx)
	if errdefs.IsFailedPrecondition(err) {
		_, err = task.Delete(ctx, client.WithProcessKill)
	}
	if err != nil {
		t.Errorf("delete task %s: %v", task.ID(), err)
	}
}

// TestContainerdKillOfACreatedTaskReportsItsExit kills a task that was
// created but never started, under runc (baseline) and boxlite, the way
// client.WithProcessKill and CRI do when they abandon a container: Wait must
// return the exit (137) and Delete must work.
func TestContainerdKillOfACreatedTaskReportsItsExit(t *testing.T) {
	c := startContainerd(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.newID(t, shortRuntime(rt))
			ctx := nsCtx(context.Background())
			ctr := c.newContainer(t, id, rt, c.plainOptions(rt), "sleep", "1000")
			defer ctr.Delete(ctx, client.WithSnapshotCleanup)
			task, err := ctr.NewTask(ctx, cio.NullIO)
			if err != nil {
				t.Fatalf("new task: %v", err)
			}
			defer c.deleteTask(t, task)
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			statusC, err := task.Wait(wctx)
			if err != nil {
				t.Fatalf("wait: %v", err)
			}
			if err := task.Kill(ctx, syscall.SIGKILL); err != nil {
				t.Fatalf("kill of a created task: %v", err)
			}
			st := <-statusC
			code, _, err := st.Result()
			if err != nil {
				t.Fatalf("no exit within 30s of killing the created task: %v", err)
			}
			if code != 137 {
				t.Errorf("exit status %d, want 137", code)
			}
		})
	}
}

// TestContainerdRootfsMountFailureFailsCleanly gives the task a rootfs
// mount that cannot be mounted, under runc (baseline) and boxlite: task
// creation fails with a mount error and nothing is left.
func TestContainerdRootfsMountFailureFailsCleanly(t *testing.T) {
	c := startContainerd(t)
	for _, rt := range []string{runcRuntime, boxliteRuntime} {
		t.Run(shortRuntime(rt), func(t *testing.T) {
			id := c.newID(t, shortRuntime(rt))
			ctx := nsCtx(context.Background())
			ctr := c.newContainer(t, id, rt, c.plainOptions(rt), "true")
			defer ctr.Delete(ctx, client.WithSnapshotCleanup)
			bad := []mount.Mount{{Type: "boxlite-no-such-fs", Source: "none", Options: []string{"ro"}}}
			task, err := ctr.NewTask(ctx, cio.NullIO, client.WithRootFS(bad))
			if err == nil {
				c.deleteTask(t, task)
				t.Fatalf("task created on an unmountable rootfs")
			}
			t.Logf("error: %v", err)
			if !strings.Contains(err.Error(), "mount") {
				t.Errorf("error %q does not mention the mount", err)
			}
			if _, err := ctr.Task(ctx, nil); !errdefs.IsNotFound(err) {
				t.Errorf("task lookup after the failed create: %v, want not found", err)
			}
			c.assertNothingHalfCreated(t, id, true)
			if m := mountedUnder(c.rootfsOf(id)); len(m) > 0 {
				t.Errorf("mounts left: %v", m)
			}
		})
	}
}
