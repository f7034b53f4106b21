package hooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/status"

	"github.com/boxlite/boxlite/pkg/reaper"
)

func TestHookGetsExactStateOnStdin(t *testing.T) {
	checkLeaks(t)
	out := filepath.Join(t.TempDir(), "record.json")
	h := helperHook("record", out)
	h.Timeout = intp(30) // a timeout that does not expire changes nothing
	st := testState()
	if err := Run(testCtx(t), "createRuntime", []specs.Hook{h}, st); err != nil {
		t.Fatal(err)
	}
	rec := readRecord(t, out)
	want, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rec.Stdin, want) {
		t.Errorf("stdin\n got %s\nwant %s", rec.Stdin, want)
	}
	var got specs.State
	if err := json.Unmarshal(rec.Stdin, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&got, st) {
		t.Errorf("state on stdin: got %+v, want %+v", got, *st)
	}
}

func TestArgsAndEnvArePassedExactly(t *testing.T) {
	for _, tc := range []struct {
		name string
		// hook returns the hook, writing its record to out, and the argv
		// and environment it must see.
		hook func(t *testing.T, out string) (h specs.Hook, args, env []string)
	}{{
		name: "argv0 differs from path",
		hook: func(t *testing.T, out string) (specs.Hook, []string, []string) {
			args := []string{helperPrefix + "record", out, "two words", "", "--flag=x"}
			env := []string{"A=1", "EMPTY=", "B=two words", "PATH=/nowhere"}
			return specs.Hook{Path: testBinary, Args: args, Env: env}, args, env
		},
	}, {
		name: "no env means an empty environment",
		hook: func(t *testing.T, out string) (specs.Hook, []string, []string) {
			args := []string{helperPrefix + "record", out}
			return specs.Hook{Path: testBinary, Args: args}, args, nil
		},
	}, {
		name: "no args means argv is the path",
		hook: func(t *testing.T, out string) (specs.Hook, []string, []string) {
			// The helper mode is argv[0]'s base name, so link it.
			link := filepath.Join(filepath.Dir(out), helperPrefix+"record")
			if err := os.Symlink(testBinary, link); err != nil {
				t.Fatal(err)
			}
			env := []string{recordOutEnv + "=" + out}
			return specs.Hook{Path: link, Env: env}, []string{link}, env
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			out := filepath.Join(t.TempDir(), "record.json")
			h, args, env := tc.hook(t, out)
			if err := Run(testCtx(t), "createContainer", []specs.Hook{h}, testState()); err != nil {
				t.Fatal(err)
			}
			rec := readRecord(t, out)
			if !slices.Equal(rec.Args, args) {
				t.Errorf("argv: got %q, want %q", rec.Args, args)
			}
			if !slices.Equal(rec.Env, env) {
				t.Errorf("env: got %q, want %q", rec.Env, env)
			}
		})
	}
}

func TestFailingHookStopsTheRunAndSaysWhy(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	first, last := filepath.Join(dir, "first.json"), filepath.Join(dir, "last.json")
	hooks := []specs.Hook{
		helperHook("record", first),
		helperHook("fail", "3", "bridge br0 not found\n", "ignored stdout"),
		helperHook("record", last),
	}
	err := Run(testCtx(t), "createRuntime", hooks, testState())
	assertError(t, err, errdefs.IsFailedPrecondition,
		hookName("createRuntime", 1)+": exited with status 3: stderr: bridge br0 not found")
	readRecord(t, first)
	assertNotRan(t, last)
}

func TestHookFailureSaysHowItEnded(t *testing.T) {
	for _, tc := range []struct {
		name string
		// hook returns the failing hook, given a scratch directory.
		hook func(t *testing.T, dir string) specs.Hook
		// want is the error message after the hook's name and ": ", with
		// PATH standing for the hook's path.
		want string
		// is is a class the error must have besides FailedPrecondition.
		is error
	}{{
		name: "stdout when stderr is empty",
		hook: func(*testing.T, string) specs.Hook { return helperHook("fail", "2", "", "\n  only stdout \n") },
		want: "exited with status 2: stdout: only stdout",
	}, {
		name: "stderr rather than stdout",
		hook: func(*testing.T, string) specs.Hook { return helperHook("fail", "1", "the reason", "noise") },
		want: "exited with status 1: stderr: the reason",
	}, {
		name: "no output",
		hook: func(*testing.T, string) specs.Hook { return helperHook("fail", "4", "", "") },
		want: "exited with status 4",
	}, {
		name: "killed by a signal",
		hook: func(*testing.T, string) specs.Hook { return helperHook("selfkill") },
		want: "killed by signal SIGKILL",
	}, {
		name: "missing binary",
		hook: func(_ *testing.T, dir string) specs.Hook { return specs.Hook{Path: filepath.Join(dir, "missing")} },
		want: "cannot start: fork/exec PATH: no such file or directory",
		is:   fs.ErrNotExist,
	}, {
		name: "not executable",
		hook: func(t *testing.T, dir string) specs.Hook {
			path := filepath.Join(dir, "hook.sh")
			if err := os.WriteFile(path, []byte("#!/bin/sh\nexit 0\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			return specs.Hook{Path: path}
		},
		want: "cannot start: fork/exec PATH: permission denied",
		is:   fs.ErrPermission,
	}, {
		name: "a directory",
		hook: func(_ *testing.T, dir string) specs.Hook { return specs.Hook{Path: dir} },
		want: "cannot start: fork/exec PATH: permission denied",
		is:   fs.ErrPermission,
	}, {
		name: "not an executable format",
		hook: func(t *testing.T, dir string) specs.Hook {
			path := filepath.Join(dir, "garbage")
			if err := os.WriteFile(path, []byte{0, 1, 2, 3}, 0o755); err != nil {
				t.Fatal(err)
			}
			return specs.Hook{Path: path}
		},
		want: "cannot start: fork/exec PATH: exec format error",
		is:   syscall.ENOEXEC,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			h := tc.hook(t, t.TempDir())
			err := Run(testCtx(t), "createRuntime", []specs.Hook{h}, testState())
			want := fmt.Sprintf("createRuntime hook #0 %q: %s", h.Path, strings.ReplaceAll(tc.want, "PATH", h.Path))
			assertError(t, err, errdefs.IsFailedPrecondition, want)
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %q is not %v", err, tc.is)
			}
		})
	}
}

func TestTimedOutHookIsKilledWithItsChildrenAndReaped(t *testing.T) {
	checkLeaks(t)
	pidfile := filepath.Join(t.TempDir(), "pids")
	h := helperHook("hang", pidfile, "tree")
	h.Timeout = intp(1)
	start := time.Now()
	err := Run(testCtx(t), "createContainer", []specs.Hook{h}, testState())
	elapsed := time.Since(start)
	assertError(t, err, errdefs.IsFailedPrecondition, hookName("createContainer", 0)+": timed out after 1s")
	if elapsed < time.Second || elapsed > time.Second+killWait {
		t.Errorf("Run returned after %v, want within [1s, %v]", elapsed, time.Second+killWait)
	}
	pids := waitPids(t, pidfile)
	if len(pids) != 2 {
		t.Fatalf("pid file holds %v, want the hook and its child", pids)
	}
	// The hook was reaped before Run returned; its child, killed with its
	// group and reparented to us, is reaped by the reaper's loop.
	assertGone(t, pids[0])
	waitGone(t, pids[1])
}

func TestCancelKillsAndReapsTheRunningHook(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	pidfile, never := filepath.Join(dir, "pids"), filepath.Join(dir, "never.json")
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	hooks := []specs.Hook{helperHook("hang", pidfile), helperHook("record", never)}
	done := make(chan error, 1)
	go func() { done <- Run(ctx, "startContainer", hooks, testState()) }()
	pids := waitPids(t, pidfile)
	cancel()
	var err error
	select {
	case err = <-done:
	case <-time.After(killWait + 10*time.Second):
		t.Fatalf("Run still running after cancel; hook %d: %s", pids[0], procStatus(pids[0]))
	}
	assertError(t, err, errdefs.IsCanceled, hookName("startContainer", 0)+": killed: context canceled")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %q is not context.Canceled", err)
	}
	assertGone(t, pids[0])
	assertNotRan(t, never)
}

func TestDoneContextStartsNoHook(t *testing.T) {
	checkLeaks(t)
	out := filepath.Join(t.TempDir(), "record.json")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	hooks := []specs.Hook{helperHook("record", out), helperHook("record", out)}

	err := Run(ctx, "prestart", hooks, testState())
	assertError(t, err, errdefs.IsCanceled, hookName("prestart", 0)+": not started: context canceled")

	errs := RunAll(ctx, "poststop", hooks, testState())
	if len(errs) != 2 {
		t.Fatalf("RunAll returned %d errors, want one per hook: %v", len(errs), errs)
	}
	for i, err := range errs {
		assertError(t, err, errdefs.IsCanceled, hookName("poststop", i)+": not started: context canceled")
	}
	assertNotRan(t, out)
}

func TestInvalidHooksAreRefusedBeforeAnyRuns(t *testing.T) {
	runners := []struct {
		name string
		run  func(context.Context, string, []specs.Hook, *specs.State) error
	}{
		{"Run", Run},
		{"RunAll", func(ctx context.Context, kind string, hooks []specs.Hook, st *specs.State) error {
			return errors.Join(RunAll(ctx, kind, hooks, st)...)
		}},
	}
	for _, tc := range []struct {
		name string
		bad  specs.Hook
		// want is the error message after `kind hook #1 "path": `.
		want string
	}{
		{"relative path", specs.Hook{Path: "bin/hook"}, "path is not absolute"},
		{"empty path", specs.Hook{}, "path is empty"},
		{"zero timeout", specs.Hook{Path: "/bin/true", Timeout: intp(0)}, "timeout 0 must be greater than zero"},
		{"negative timeout", specs.Hook{Path: "/bin/true", Timeout: intp(-5)}, "timeout -5 must be greater than zero"},
		{"NUL in an argument", specs.Hook{Path: "/bin/true", Args: []string{"true", "a\x00b"}}, `"a\x00b" holds a NUL byte`},
		{"NUL in the environment", specs.Hook{Path: "/bin/true", Env: []string{"A=\x00"}}, `"A=\x00" holds a NUL byte`},
		{"NUL in the path", specs.Hook{Path: "/bin/\x00true"}, "path holds a NUL byte"},
	} {
		for _, r := range runners {
			t.Run(tc.name+"/"+r.name, func(t *testing.T) {
				checkLeaks(t)
				out := filepath.Join(t.TempDir(), "record.json")
				hooks := []specs.Hook{helperHook("record", out), tc.bad}
				err := r.run(testCtx(t), "poststart", hooks, testState())
				want := fmt.Sprintf("poststart hook #1 %q: %s", tc.bad.Path, tc.want)
				assertError(t, err, errdefs.IsInvalidArgument, want)
				assertNotRan(t, out)
			})
		}
	}
}

func TestValidateReportsEveryBadHook(t *testing.T) {
	good := specs.Hook{Path: "/bin/true", Timeout: intp(1)}
	if err := Validate("poststop", []specs.Hook{good, good}); err != nil {
		t.Errorf("valid hooks: %v", err)
	}
	if err := Validate("poststop", nil); err != nil {
		t.Errorf("no hooks: %v", err)
	}
	err := Validate("poststop", []specs.Hook{{Path: "rel"}, good, {Path: "/x", Timeout: intp(0)}})
	assertError(t, err, errdefs.IsInvalidArgument,
		`poststop hook #0 "rel": path is not absolute`+"\n"+
			`poststop hook #2 "/x": timeout 0 must be greater than zero`)
}

func TestMissingStateIsRefused(t *testing.T) {
	checkLeaks(t)
	out := filepath.Join(t.TempDir(), "record.json")
	err := Run(testCtx(t), "createRuntime", []specs.Hook{helperHook("record", out)}, nil)
	assertError(t, err, errdefs.IsInvalidArgument, "createRuntime hooks: no container state")
	assertNotRan(t, out)
}

func TestRunAllRunsEveryHookAndReportsEachFailure(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	second, fourth := filepath.Join(dir, "second.json"), filepath.Join(dir, "fourth.json")
	hooks := []specs.Hook{
		helperHook("fail", "2", "first failed\n", ""),
		helperHook("record", second),
		helperHook("fail", "5", "", "third failed\n"),
		helperHook("record", fourth),
	}
	errs := RunAll(testCtx(t), "poststop", hooks, testState())
	if len(errs) != 2 {
		t.Fatalf("got %d errors, want 2: %v", len(errs), errs)
	}
	assertError(t, errs[0], errdefs.IsFailedPrecondition, hookName("poststop", 0)+": exited with status 2: stderr: first failed")
	assertError(t, errs[1], errdefs.IsFailedPrecondition, hookName("poststop", 2)+": exited with status 5: stdout: third failed")
	readRecord(t, second)
	readRecord(t, fourth)

	if errs := RunAll(testCtx(t), "poststop", hooks[1:2], testState()); errs != nil {
		t.Errorf("all hooks succeeded, got errors %v", errs)
	}
}

func TestHookNotReadingStdinDoesNotBlockTheRun(t *testing.T) {
	checkLeaks(t)
	st := testState()
	// Far more than a pipe's buffer (64 KiB): exec's copy to stdin must
	// end with EPIPE when the hook exits, not block.
	st.Annotations["big"] = strings.Repeat("s", 1<<20)
	start := time.Now()
	if err := Run(testCtx(t), "createRuntime", []specs.Hook{helperHook("noread")}, st); err != nil {
		t.Fatal(err)
	}
	// Well under ioWaitDelay: the run did not need the pipes closed for it.
	if elapsed := time.Since(start); elapsed >= ioWaitDelay {
		t.Errorf("Run took %v, want under %v", elapsed, ioWaitDelay)
	}
}

func TestHookOutputIsCappedToItsLastBytes(t *testing.T) {
	for _, stream := range []string{"stderr", "stdout"} {
		t.Run(stream, func(t *testing.T) {
			checkLeaks(t)
			err := Run(testCtx(t), "createRuntime", []specs.Hook{helperHook("spew", stream)}, testState())
			if !errdefs.IsFailedPrecondition(err) {
				t.Fatalf("got %v, want a failed hook", err)
			}
			msg := err.Error()
			head := fmt.Sprintf("%s: exited with status 1: %s (last %d of %d bytes): ",
				hookName("createRuntime", 0), stream, outputLimit, spewSize+len(spewEnd)+1)
			if !strings.HasPrefix(msg, head) {
				t.Errorf("error starts %.200q, want %q", msg, head)
			}
			if !strings.HasSuffix(msg, spewEnd) {
				t.Errorf("error ends %q, want the end of the output", msg[max(0, len(msg)-40):])
			}
			if len(msg) > len(head)+outputLimit {
				t.Errorf("error holds %d bytes of output, want at most %d", len(msg)-len(head), outputLimit)
			}
		})
	}
}

func TestDescendantHoldingStdoutDoesNotBlockTheRun(t *testing.T) {
	checkLeaks(t)
	pidfile := filepath.Join(t.TempDir(), "pid")
	start := time.Now()
	err := Run(testCtx(t), "poststart", []specs.Hook{helperHook("daemon", pidfile)}, testState())
	elapsed := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if elapsed > ioWaitDelay+10*time.Second {
		t.Errorf("Run took %v, want about %v", elapsed, ioWaitDelay)
	}
	// The daemon, reparented to us, is the test's to stop.
	daemon := reaper.Default().Claim(waitPids(t, pidfile)[0], start)
	if err := daemon.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := daemon.Wait(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	assertGone(t, daemon.Pid())
}

// TestHookErrorsCrossTheWire converts a failing hook's error for ttrpc, as
// the shim's Create does. Its error tree once held a nil cause, on which
// errgrpc.ToGRPC panicked and took the shim down; verified two-sided (the
// conversion panics with Unwrap returning the nil cause).
func TestHookErrorsCrossTheWire(t *testing.T) {
	checkLeaks(t)
	err := Run(context.Background(), "createRuntime", []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "echo nope >&2; exit 3"}}}, testState())
	if err == nil {
		t.Fatal("failing hook: no error")
	}
	st, ok := status.FromError(errgrpc.ToGRPC(err))
	if !ok || !strings.Contains(st.Message(), "nope") {
		t.Errorf("wire error %v does not carry the hook's stderr", st)
	}
	if !errdefs.IsFailedPrecondition(errgrpc.ToNative(errgrpc.ToGRPC(err))) {
		t.Errorf("class lost on the wire: %v", err)
	}
}
