package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// shortDir returns a short temporary directory (shim sockets live under it).
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bxm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// newTestManager returns a manager on a fresh state directory that
// bootstraps the fake shim (this test binary), and registers a check that
// every shim the test started is gone and reaped.
func newTestManager(t *testing.T) *Manager {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{StateRoot: filepath.Join(shortDir(t), "st"), ShimBinary: self, Self: self})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { assertNoChildren(t) })
	return m
}

// newTestRootfs returns an (empty) rootfs directory.
func newTestRootfs(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "rootfs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// assertNoChildren fails the test if a child of the test process (a fake
// shim reparented to it) does not exit and get reaped within a bound.
func assertNoChildren(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range reaper.Children(os.Getpid()) {
		out, _, err := reaper.Default().Reap(pid, deadline)
		if err != nil || out == reaper.TimedOut {
			status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			t.Errorf("leak: child %d still alive (%v, %v):\n%s", pid, out, err, statusLines(status))
		}
	}
}

func statusLines(status []byte) string {
	var out []string
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "Name:") || strings.HasPrefix(l, "State:") || strings.HasPrefix(l, "PPid:") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// syncBuffer is a bytes.Buffer safe for the relay goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testBox is a box created through the fake shim, its output going to a
// framed log in its directory as the Service's boxes' does.
type testBox struct {
	*Box
}

func createBox(t *testing.T, m *Manager, name string, args ...string) *testBox {
	t.Helper()
	box, err := m.Create(context.Background(), CreateOptions{
		Name: name, Spec: BoxSpec{Args: args, Rootfs: newTestRootfs(t)},
		Stdio: func(dir string) (Stdio, error) { return boxStdio(dir, "box", false, false) },
	})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { box.Close() })
	return &testBox{Box: box}
}

// readOutput returns what the framed log a Stdio's stdout names holds, by
// stream.
func readOutput(t *testing.T, stdout string) (string, string) {
	t.Helper()
	path := logPathOf(stdout)
	if path == "" {
		t.Fatalf("stdout %q is not a framed log", stdout)
	}
	var out, errOut syncBuffer
	if err := readLog(context.Background(), path, time.Time{}, false, nil, &out, &errOut); err != nil {
		t.Fatalf("read log: %v", err)
	}
	return out.String(), errOut.String()
}

func TestRunLogsOutputByStreamAndRecordsTheExit(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "", "exit", "3")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	exit, err := b.Wait(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if exit.Status != 3 {
		t.Errorf("exit status %d, want 3", exit.Status)
	}
	if err := b.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// The log outlives the shim.
	if stdout, stderr := readOutput(t, b.Record().Stdout); stdout != "bye\n" || stderr != "oops\n" {
		t.Errorf("stdout %q, stderr %q: want bye and oops, kept apart", stdout, stderr)
	}
	rec, err := m.Store().Get(b.ID())
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != StatusStopped || rec.ExitStatus != 3 || rec.ShimPid != 0 {
		t.Errorf("record after stop: status %s exit %d shim %d, want stopped 3 without shim", rec.Status, rec.ExitStatus, rec.ShimPid)
	}
}

func TestShimIsBootstrappedLikeContainerdDoes(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "", "sleep")
	data, err := os.ReadFile(filepath.Join(b.Record().Bundle, "bootstrap-received.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]string
	json.Unmarshal(data, &got)
	want := map[string]string{
		"id": b.ID(), "ns": "boxlite", "cwd": b.Record().Bundle, "socket_dir": m.Store().SocketDir(),
		"ttrpc": m.Store().EventsSocket(), "address": filepath.Join(m.Store().Root(), "grpc.sock"), "publish": m.shim.self,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("shim got %s %q, want %q", k, got[k], v)
		}
	}
	if err := b.Remove(context.Background(), true); err != nil {
		t.Fatal(err)
	}
}

func TestRemoveOfARunningBoxNeedsForce(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "web", "sleep")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	err := b.Remove(ctx, false)
	if err == nil || err.Error() != "box web is running: stop it or use rm --force" || !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("rm without force: %v", err)
	}
	shim := b.Record().ShimIdentity()
	if err := b.Remove(ctx, true); err != nil {
		t.Fatalf("rm --force: %v", err)
	}
	if ok, _ := shim.Exists(); ok {
		t.Errorf("shim pid %d still present after rm --force", shim.Pid)
	}
	if _, err := os.Stat(b.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("box directory left: %v", err)
	}
	if _, err := m.Store().Get("web"); !errdefs.IsNotFound(err) {
		t.Errorf("record left: %v", err)
	}
	if entries, _ := os.ReadDir(m.Store().SocketDir()); len(entries) > 0 {
		t.Errorf("socket left: %v", entries[0].Name())
	}
}

func TestKillEndsTheProcessWithItsSignal(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "", "sleep")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if err := b.Kill(ctx, "", syscall.SIGTERM, false); err != nil {
		t.Fatal(err)
	}
	exit, err := b.Wait(ctx, "")
	if err != nil || exit.Status != 143 {
		t.Fatalf("wait after SIGTERM: %v, %v; want 143", exit.Status, err)
	}
	if err := b.Remove(ctx, false); err != nil {
		t.Fatalf("rm of a stopped box: %v", err)
	}
}

func TestExecRunsInTheBoxWithItsOwnExitCode(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "", "sleep")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	st, err := boxStdio(b.Dir(), "exec-1", false, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Exec(ctx, "exec-1", ExecSpec{Args: []string{"exit", "5"}}, st); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Start(ctx, "exec-1"); err != nil {
		t.Fatal(err)
	}
	exit, err := b.Wait(ctx, "exec-1")
	if err != nil || exit.Status != 5 {
		t.Fatalf("exec exit %d, %v; want 5", exit.Status, err)
	}
	if err := b.DeleteExec(ctx, "exec-1"); err != nil {
		t.Fatal(err)
	}
	if stdout, stderr := readOutput(t, st.Stdout); stdout != "bye\n" || stderr != "oops\n" {
		t.Errorf("exec stdout %q, stderr %q: want bye and oops", stdout, stderr)
	}
	if stdout, _ := readOutput(t, b.Record().Stdout); stdout != "" {
		t.Errorf("the exec's output reached the box's log: %q", stdout)
	}
	if st := b.Record().Status; st != StatusRunning {
		t.Errorf("box %s after exec, want running", st)
	}
	if err := b.Remove(ctx, true); err != nil {
		t.Fatal(err)
	}
}

func TestANewManagerReconnectsToALiveShim(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "svc", "sleep")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	b.Close()
	// A manager restart is a new process reading the same state.
	m2, err := New(Config{StateRoot: m.Store().Root(), ShimBinary: m.shim.binary, Self: m.shim.self})
	if err != nil {
		t.Fatal(err)
	}
	recs, err := m2.List(ctx)
	if err != nil || len(recs) != 1 || recs[0].Status != StatusRunning {
		t.Fatalf("list after restart: %+v, %v", recs, err)
	}
	b2, err := m2.Get(ctx, "svc")
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if err := b2.Kill(ctx, "", syscall.SIGKILL, false); err != nil {
		t.Fatalf("kill after restart: %v", err)
	}
	if exit, err := b2.Wait(ctx, ""); err != nil || exit.Status != 137 {
		t.Fatalf("wait after restart: %d, %v", exit.Status, err)
	}
	if err := b2.Remove(ctx, false); err != nil {
		t.Fatal(err)
	}
}

func TestADeadShimMeansStoppedWith137AndNoStaleFiles(t *testing.T) {
	m := newTestManager(t)
	b := createBox(t, m, "", "sleep")
	ctx := context.Background()
	if _, err := b.Start(ctx, ""); err != nil {
		t.Fatal(err)
	}
	rec := b.Record()
	b.Close()
	if err := syscall.Kill(rec.ShimPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if out, _, err := reaper.Default().Reap(rec.ShimPid, time.Now().Add(10*time.Second)); err != nil || out == reaper.TimedOut {
		t.Fatalf("reap killed shim: %v %v", out, err)
	}
	recs, err := m.List(ctx)
	if err != nil || len(recs) != 1 {
		t.Fatalf("list: %+v, %v", recs, err)
	}
	got := recs[0]
	if got.Status != StatusStopped || got.ExitStatus != 137 || got.ShimPid != 0 || got.ShimAddress != "" {
		t.Errorf("after shim death: %+v, want stopped 137 without shim", got)
	}
	if _, err := os.Stat(filepath.Join(rec.Bundle, "delete-action-ran")); err != nil {
		t.Errorf("the shim's delete action did not run: %v", err)
	}
	if _, err := os.Stat(strings.TrimPrefix(rec.ShimAddress, "unix://")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale shim socket left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(b.Dir(), ioDirName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale io directory (FIFOs) left: %v", err)
	}
	b2, err := m.Get(ctx, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := b2.Remove(ctx, false); err != nil {
		t.Fatalf("rm of a box whose shim died: %v", err)
	}
}

func TestAReusedShimPidIsNotMistakenForTheShim(t *testing.T) {
	m := newTestManager(t)
	// A record whose shim pid now names another process (this one) with
	// another start time.
	me, err := reaper.ReadIdentity(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	rec := &Record{ID: NewID(), Bundle: m.Store().BundleDir("x"), Status: StatusRunning, CreatedAt: time.Now(),
		ShimAddress: "unix://" + filepath.Join(m.Store().SocketDir(), "gone"), ShimPid: me.Pid, ShimStartTime: me.StartTime + 1}
	rec.Bundle = m.Store().BundleDir(rec.ID)
	if err := m.Store().Add(rec); err != nil {
		t.Fatal(err)
	}
	recs, err := m.List(context.Background())
	if err != nil || len(recs) != 1 {
		t.Fatalf("list: %+v, %v", recs, err)
	}
	if recs[0].Status != StatusStopped || recs[0].ExitStatus != 137 || recs[0].ShimPid != 0 {
		t.Errorf("record with a reused pid: %+v, want stopped 137", recs[0])
	}
}

func TestAFailedCreateLeavesNothing(t *testing.T) {
	tests := []struct {
		name, env, value, wantErr string
	}{
		{"task create fails", fakeCreateFail, "1", "guest refused the box"},
		{"shim start fails", fakeStartOutput, "fail", "refusing to start"},
		{"shim prints garbage", fakeStartOutput, "garbage", "no usable address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestManager(t)
			t.Setenv(tt.env, tt.value)
			_, err := m.Create(context.Background(), CreateOptions{Name: "x", Spec: BoxSpec{Args: []string{"sleep"}, Rootfs: newTestRootfs(t)}})
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("create: %v, want %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			recs, _ := m.Store().List()
			entries, _ := os.ReadDir(filepath.Join(m.Store().Root(), boxesDir))
			if len(recs) > 0 || len(entries) > 0 {
				t.Errorf("left behind: %d records, %d entries", len(recs), len(entries))
			}
			assertNoChildren(t)
			if entries, _ := os.ReadDir(m.Store().SocketDir()); len(entries) > 0 {
				t.Errorf("socket left: %s", entries[0].Name())
			}
		})
	}
}

func TestBootstrapAcceptsEveryAnswerContainerdAccepts(t *testing.T) {
	for _, mode := range []string{"proto", "json", "plain"} {
		t.Run(mode, func(t *testing.T) {
			m := newTestManager(t)
			t.Setenv(fakeStartOutput, mode)
			b := createBox(t, m, "", "exit", "0")
			if err := b.Remove(context.Background(), true); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCreateRejectsBadInputBeforeStartingAnything(t *testing.T) {
	m := newTestManager(t)
	rootfs := newTestRootfs(t)
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	b := createBox(t, m, "taken", "sleep")
	defer b.Remove(context.Background(), true)
	tests := []struct {
		name string
		o    CreateOptions
		want string
	}{
		{"missing rootfs", CreateOptions{Spec: BoxSpec{Args: []string{"sleep"}, Rootfs: "/nonexistent/rootfs"}}, "rootfs /nonexistent/rootfs does not exist"},
		{"rootfs is a file", CreateOptions{Spec: BoxSpec{Args: []string{"sleep"}, Rootfs: file}}, "is not a directory"},
		{"no command", CreateOptions{Spec: BoxSpec{Rootfs: rootfs}}, "no command given"},
		{"duplicate name", CreateOptions{Name: "taken", Spec: BoxSpec{Args: []string{"sleep"}, Rootfs: rootfs}}, `a box named "taken" already exists`},
		{"bad name", CreateOptions{Name: "a/b", Spec: BoxSpec{Args: []string{"sleep"}, Rootfs: rootfs}}, "invalid box name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := m.Create(context.Background(), tt.o)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want %q", err, tt.want)
			}
			if recs, _ := m.Store().List(); len(recs) != 1 {
				t.Errorf("%d records, want only the first box", len(recs))
			}
		})
	}
}

func TestFindShimSaysRunMakeBuild(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := FindShim(filepath.Join(t.TempDir(), "boxlite"))
	if err == nil || !strings.Contains(err.Error(), "run make build") || !errdefs.IsNotFound(err) {
		t.Fatalf("FindShim: %v", err)
	}
	dir := t.TempDir()
	shim := filepath.Join(dir, ShimBinaryName)
	os.WriteFile(shim, []byte("#!/bin/sh\n"), 0o755)
	if got, err := FindShim(filepath.Join(dir, "boxlite")); err != nil || got != shim {
		t.Fatalf("FindShim next to boxlite: %q, %v", got, err)
	}
}
