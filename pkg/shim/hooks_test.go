package shim

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

func TestCheckHooks(t *testing.T) {
	ok := func() []specs.Hook {
		timeout := 5
		return []specs.Hook{{Path: "/bin/true"}, {Path: "/usr/bin/env", Args: []string{"env"}, Timeout: &timeout}}
	}
	zero := 0
	for _, tc := range []struct {
		name  string
		hooks *specs.Hooks
		// want are substrings of the error; none means valid.
		want []string
	}{
		{name: "no hooks"},
		{name: "empty hooks", hooks: &specs.Hooks{}},
		{name: "host-side kinds with absolute paths", hooks: &specs.Hooks{
			Prestart: ok(), CreateRuntime: ok(), Poststart: ok(), Poststop: ok(),
		}},
		{name: "createContainer", hooks: &specs.Hooks{CreateContainer: ok()}, want: []string{
			"createContainer and startContainer hooks run in the container's namespaces, which are inside the VM, where host binaries cannot run",
			"use prestart or createRuntime hooks",
		}},
		{name: "startContainer", hooks: &specs.Hooks{Poststart: ok(), StartContainer: ok()}, want: []string{
			"createContainer and startContainer hooks run in the container's namespaces",
		}},
		{name: "relative path", hooks: &specs.Hooks{Poststop: []specs.Hook{{Path: "/bin/true"}, {Path: "bin/true"}}},
			want: []string{`poststop hook #1 "bin/true": path is not absolute`}},
		{name: "empty path", hooks: &specs.Hooks{Prestart: []specs.Hook{{}}},
			want: []string{`prestart hook #0 "": path is empty`}},
		{name: "zero timeout", hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true", Timeout: &zero}}},
			want: []string{`createRuntime hook #0 "/bin/true": timeout 0 must be greater than zero`}},
		{name: "every bad hook is reported", hooks: &specs.Hooks{
			Prestart:  []specs.Hook{{Path: "true"}},
			Poststart: []specs.Hook{{Path: "/bin/true", Timeout: &zero}},
		}, want: []string{`prestart hook #0 "true": path is not absolute`, `poststart hook #0 "/bin/true": timeout 0`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkHooks(&specs.Spec{Hooks: tc.hooks})
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("checkHooks() = %v, want nil", err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("checkHooks() = %v, want invalid argument", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("checkHooks() = %v, want it to say %q", err, w)
				}
			}
		})
	}
}

// recordHook is a hook that writes its stdin (the state) to out and
// appends its name to the log order.
func recordHook(name, out, order string) specs.Hook {
	return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", `echo "$1" >> "$2"; /bin/cat > "$3"`, "sh", name, order, out}}
}

// failHook is a hook that appends its name to order and exits 3.
func failHook(name, order string) specs.Hook {
	return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", `echo "$1" >> "$2"; echo "$1 broke" >&2; exit 3`, "sh", name, order}}
}

// readState reads the state a recordHook wrote to path.
func readState(t *testing.T, path string) specs.State {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("hook state: %v", err)
	}
	var st specs.State
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatalf("hook state %q: %v", data, err)
	}
	return st
}

// readOrder returns the names the hooks appended to order, in order.
func readOrder(t *testing.T, order string) []string {
	t.Helper()
	data, err := os.ReadFile(order)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(data))
}

// hookBox is a box with the given hooks and nothing running.
func hookBox(t *testing.T, hooks *specs.Hooks) *container {
	t.Helper()
	return &container{
		id: "box1", ns: "default", bundle: t.TempDir(),
		ociSpec: &specs.Spec{Annotations: map[string]string{"io.example/team": "db"}, Hooks: hooks},
	}
}

// Each hook kind sees the state runc would give it: the status of its
// point in the lifecycle, the pid given (the VMM's), the bundle and the
// annotations; kinds run in the order asked.
func TestHooksGetTheStateOfTheirKind(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	order := filepath.Join(dir, "order")
	out := func(kind string) string { return filepath.Join(dir, kind+".json") }
	kinds := []string{hookPrestart, hookCreateRuntime, hookPoststart, hookPoststop}
	hooks := &specs.Hooks{}
	for _, kind := range kinds {
		h := recordHook(kind, out(kind), order)
		switch kind {
		case hookPrestart:
			hooks.Prestart = []specs.Hook{h}
		case hookCreateRuntime:
			hooks.CreateRuntime = []specs.Hook{h}
		case hookPoststart:
			hooks.Poststart = []specs.Hook{h}
		case hookPoststop:
			hooks.Poststop = []specs.Hook{h}
		}
	}
	b := hookBox(t, hooks)
	ctx := testCtx(t, testTimeout)
	if err := b.runHooks(ctx, 4242, hookPrestart, hookCreateRuntime); err != nil {
		t.Fatal(err)
	}
	if err := b.runHooks(ctx, 4242, hookPoststart); err != nil {
		t.Fatal(err)
	}
	if err := b.runHooks(ctx, 4242, hookPoststop); err != nil {
		t.Fatal(err)
	}
	if got := readOrder(t, order); strings.Join(got, " ") != strings.Join(kinds, " ") {
		t.Errorf("hooks ran in order %q, want %q", got, kinds)
	}
	for kind, status := range map[string]specs.ContainerState{
		hookPrestart: specs.StateCreating, hookCreateRuntime: specs.StateCreating,
		hookPoststart: specs.StateRunning, hookPoststop: specs.StateStopped,
	} {
		st := readState(t, out(kind))
		if st.Version != specs.Version || st.ID != "box1" || st.Status != status || st.Pid != 4242 ||
			st.Bundle != b.bundle || st.Annotations["io.example/team"] != "db" || len(st.Annotations) != 1 {
			t.Errorf("%s hook got state %+v; want status %s, pid 4242, bundle %s and the annotations", kind, st, status, b.bundle)
		}
	}
}

// A failing createRuntime (or prestart) hook fails the operation and stops
// the hooks after it; failing poststart and poststop hooks are only
// logged, and the hooks after them still run. poststop hooks run even when
// the request's ctx is already done.
func TestHookFailuresFailOnlyCreate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kind   string
		cancel bool
		// want is a substring of the error; "" means no error.
		want string
		// ran are the hooks that ran.
		ran []string
	}{
		{name: "createRuntime", kind: hookCreateRuntime, want: `createRuntime hook #0 "/bin/sh"`, ran: []string{"bad"}},
		{name: "prestart", kind: hookPrestart, want: `prestart hook #0 "/bin/sh"`, ran: []string{"bad"}},
		{name: "poststart", kind: hookPoststart, ran: []string{"bad", "good"}},
		{name: "poststop", kind: hookPoststop, ran: []string{"bad", "good"}},
		{name: "poststop with a cancelled ctx", kind: hookPoststop, cancel: true, ran: []string{"bad", "good"}},
		{name: "createRuntime with a cancelled ctx", kind: hookCreateRuntime, cancel: true, want: "not started"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			dir := t.TempDir()
			order, out := filepath.Join(dir, "order"), filepath.Join(dir, "state.json")
			list := []specs.Hook{failHook("bad", order), recordHook("good", out, order)}
			hooks := &specs.Hooks{}
			switch tc.kind {
			case hookPrestart:
				hooks.Prestart = list
			case hookCreateRuntime:
				hooks.CreateRuntime = list
			case hookPoststart:
				hooks.Poststart = list
			case hookPoststop:
				hooks.Poststop = list
			}
			logger, logs := logtest.NewNullLogger()
			ctx := log.WithLogger(testCtx(t, testTimeout), logrus.NewEntry(logger))
			if tc.cancel {
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				cancel()
			}
			err := hookBox(t, hooks).runHooks(ctx, 1, tc.kind)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("runHooks(%s) = %v; a failing %s hook is only logged", tc.kind, err, tc.kind)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("runHooks(%s) = %v; want an error containing %q", tc.kind, err, tc.want)
			case tc.want != "" && !tc.cancel && !strings.Contains(err.Error(), "bad broke"):
				t.Errorf("runHooks(%s) = %v; want the hook's stderr in it", tc.kind, err)
			}
			if got := readOrder(t, order); strings.Join(got, " ") != strings.Join(tc.ran, " ") {
				t.Errorf("hooks that ran: %q, want %q", got, tc.ran)
			}
			// What is not returned is logged, once, as a warning naming
			// the box and the hook's failure.
			var warned []string
			for _, e := range logs.AllEntries() {
				if e.Level == logrus.WarnLevel && e.Data["id"] == "box1" {
					if err, ok := e.Data[logrus.ErrorKey].(error); ok {
						warned = append(warned, e.Message+": "+err.Error())
					}
				}
			}
			wantWarned := 0
			if tc.want == "" {
				wantWarned = 1
			}
			if len(warned) != wantWarned || (wantWarned == 1 && !strings.Contains(warned[0], tc.kind+" hook failed: "+tc.kind+` hook #0 "/bin/sh": exited with status 3`)) {
				t.Errorf("warnings %q; want %d naming the failed %s hook", warned, wantWarned, tc.kind)
			}
		})
	}
}

// A box without a spec or hooks runs nothing.
func TestRunHooksWithoutHooks(t *testing.T) {
	for _, b := range []*container{{id: "a"}, {id: "b", ociSpec: &specs.Spec{}}} {
		if err := b.runHooks(context.Background(), 1, hookPrestart, hookPoststop); err != nil {
			t.Errorf("box %s: %v", b.id, err)
		}
	}
}
