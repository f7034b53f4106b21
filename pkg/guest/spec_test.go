package guest

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

const hostSpec = `{
  "ociVersion": "1.2.0",
  "process": {"terminal": true, "user": {"uid": 1000, "gid": 100}, "args": ["sh", "-c", "true"],
    "env": ["A=1"], "cwd": "/work", "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 64}]},
  "root": {"path": "/var/lib/host/rootfs", "readonly": true},
  "hostname": "box",
  "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
  "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}], "poststop": [{"path": "/x"}]},
  "annotations": {"a": "b"},
  "futureField": {"kept": true},
  "linux": {
    "cgroupsPath": "/kubepods/pod1/c1",
    "resources": {"memory": {"limit": 1048576}, "pids": {"limit": 10}},
    "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"}],
    "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"},
    "maskedPaths": ["/proc/kcore"]
  }
}`

func TestRewriteSpecRewritesHostOnlyFields(t *testing.T) {
	out, spec, err := rewriteSpec([]byte(hostSpec), specEdit{rootPath: "/run/boxlite/rootfs/c1", cgroupsPath: "/boxlite/c1"})
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name string
		ok   bool
	}{
		{"hooks dropped", spec.Hooks == nil && !strings.Contains(string(out), "host-hook")},
		{"root.path is the guest mount", spec.Root.Path == "/run/boxlite/rootfs/c1"},
		{"root.readonly kept", spec.Root.Readonly},
		{"cgroupsPath rewritten", spec.Linux.CgroupsPath == "/boxlite/c1"},
		{"namespace types kept", len(spec.Linux.Namespaces) == 4 && spec.Linux.Namespaces[1].Type == "network"},
		{"cgroup namespace added (the guest is cgroup v2 only)", spec.Linux.Namespaces[3].Type == "cgroup"},
		{"namespace paths dropped", spec.Linux.Namespaces[1].Path == ""},
		{"terminal set by the agent", !spec.Process.Terminal},
		{"process kept", spec.Process.User.UID == 1000 && spec.Process.Cwd == "/work" && spec.Process.Env[0] == "A=1" && len(spec.Process.Rlimits) == 1},
		{"resources kept", *spec.Linux.Resources.Memory.Limit == 1048576 && spec.Linux.Resources.Pids.Limit != nil},
		{"seccomp kept", spec.Linux.Seccomp != nil && spec.Linux.Seccomp.DefaultAction == "SCMP_ACT_ALLOW"},
		{"mounts kept", len(spec.Mounts) == 1 && spec.Mounts[0].Destination == "/proc"},
		{"annotations kept", spec.Annotations["a"] == "b"},
		{"hostname kept", spec.Hostname == "box"},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("%s", c.name)
		}
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	if string(doc["futureField"]) != `{"kept":true}` {
		t.Errorf("unknown field not kept: %s", doc["futureField"])
	}
}

func TestRewriteSpecRejectsBadSpecs(t *testing.T) {
	tests := []struct {
		name string
		spec string
	}{
		{"not json", "{"},
		{"not an object", "[]"},
		{"null", "null"},
		{"no process", `{"root": {"path": "r"}}`},
		{"process without args", `{"process": {"cwd": "/"}}`},
		{"root not an object", `{"process": {"args": ["a"]}, "root": "x"}`},
		{"namespaces not a list", `{"process": {"args": ["a"]}, "linux": {"namespaces": {}}}`},
		{"too large", `{"process": {"args": ["` + strings.Repeat("a", maxSpecSize) + `"]}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := rewriteSpec([]byte(tt.spec), specEdit{rootPath: "/r"}); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
		})
	}
}

func TestRewriteSpecAddsMissingSections(t *testing.T) {
	_, spec, err := rewriteSpec([]byte(`{"process": {"args": ["true"]}}`), specEdit{rootPath: "/r", cgroupsPath: "/boxlite/x"})
	if err != nil {
		t.Fatal(err)
	}
	if spec.Root == nil || spec.Root.Path != "/r" || spec.Linux == nil || spec.Linux.CgroupsPath != "/boxlite/x" {
		t.Fatalf("root %+v linux %+v", spec.Root, spec.Linux)
	}
}

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"c1", true},
		{"A-b_c.9", true},
		{strings.Repeat("a", 64), true},
		// nerdctl's exec ids: "exec-" and 64 hex digits. Verified
		// two-sided: refused with the old bound of 64.
		{"exec-" + strings.Repeat("0123abcd", 8), true},
		{strings.Repeat("a", 76), true},
		{strings.Repeat("a", 128), true},
		{strings.Repeat("a", 129), false},
		{"", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{"../etc", false},
		{"a b", false},
		{"a\x00b", false},
		{"é", false},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			err := validateID("container id", tt.id)
			if tt.ok && err != nil {
				t.Fatalf("rejected: %v", err)
			}
			if !tt.ok && !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
		})
	}
}

func TestDecodeProcess(t *testing.T) {
	tests := []struct {
		name string
		json string
		ok   bool
	}{
		{"args", `{"args": ["ls"], "cwd": "/", "terminal": true}`, true},
		{"no args", `{"cwd": "/"}`, false},
		{"not json", `x`, false},
		{"too large", `{"args": ["` + strings.Repeat("a", maxProcessSize) + `"]}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := decodeProcess([]byte(tt.json), false)
			if tt.ok {
				if err != nil || p.Terminal {
					t.Fatalf("got %+v, %v", p, err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
		})
	}
}

func TestRewriteSpecClampsTheVersionForTheGuestRuntime(t *testing.T) {
	tests := []struct {
		in, want string
		bad      bool
	}{
		{in: "1.3.0", want: guestSpecVersion},
		{in: "1.2.1", want: guestSpecVersion},
		{in: "1.1.0", want: "1.1.0"},
		{in: "1.0.2-dev", want: "1.0.2-dev"},
		{in: "2.0.0", bad: true},
		{in: "latest", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			spec := `{"ociVersion": "` + tt.in + `", "process": {"args": ["true"]}}`
			_, got, err := rewriteSpec([]byte(spec), specEdit{rootPath: "/r"})
			if tt.bad {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("err = %v, want invalid argument", err)
				}
				return
			}
			if err != nil || got.Version != tt.want {
				t.Fatalf("version %q, %v; want %q", got.Version, err, tt.want)
			}
		})
	}
}

// A pod's app container names its pod's namespaces by host paths; the
// agent joins the sandbox container's guest namespaces of the types the
// host lists and gives the others new namespaces.
func TestRewriteSpecJoinsThePodsNamespaces(t *testing.T) {
	const member = `{"process": {"args": ["sh"]}, "root": {"path": "rootfs"}, "linux": {"namespaces": [
		{"type": "pid"}, {"type": "network", "path": "/proc/99/ns/net"}, {"type": "ipc", "path": "/proc/99/ns/ipc"},
		{"type": "uts", "path": "/proc/99/ns/uts"}, {"type": "mount"}]}}`
	joins := map[string]string{"network": "/proc/7/ns/net", "ipc": "/proc/7/ns/ipc"}
	_, spec, err := rewriteSpec([]byte(member), specEdit{rootPath: "/r", joins: joins})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, ns := range spec.Linux.Namespaces {
		got[string(ns.Type)] = ns.Path
	}
	want := map[string]string{"pid": "", "network": "/proc/7/ns/net", "ipc": "/proc/7/ns/ipc", "uts": "", "mount": "", "cgroup": ""}
	for typ, p := range want {
		if got[typ] != p {
			t.Errorf("%s namespace path %q; want %q", typ, got[typ], p)
		}
	}
	// Joining a namespace the spec does not share is refused: the host
	// and the spec disagree.
	_, _, err = rewriteSpec([]byte(member), specEdit{rootPath: "/r", joins: map[string]string{"pid": "/proc/7/ns/pid"}})
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "pid namespace") {
		t.Errorf("joining an unshared pid namespace: %v; want invalid argument naming it", err)
	}
}

// The host shares the submounts of an rbind volume on their own; the
// agent binds each at its place after the volume, read-only or not as the
// host says (runc's "ro" leaves submounts writable, "rro" does not).
func TestRewriteSpecBindsTheSubmountsOfAVolume(t *testing.T) {
	const spec = `{"process": {"args": ["sh"]}, "root": {"path": "rootfs"}, "mounts": [
		{"destination": "/mnt", "type": "bind", "source": "/host/vol", "options": ["rbind", "ro"]},
		{"destination": "/proc", "type": "proc", "source": "proc"},
		{"destination": "/rro", "type": "bind", "source": "/host/vol", "options": ["rbind", "rro"]}]}`
	subs, err := sharedSubmounts("/share", []*api.SharedMount{
		{Index: 0, Path: "c/x/m0", Submounts: []*api.Submount{{Subpath: "tmpfs", Path: "c/x/m0.0"}, {Subpath: "a/b", Path: "c/x/m0.1", ReadOnly: true}}},
		{Index: 2, Path: "c/x/m2", Submounts: []*api.Submount{{Subpath: "tmpfs", Path: "c/x/m2.0", ReadOnly: true}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, got, err := rewriteSpec([]byte(spec), specEdit{rootPath: "/r",
		sources: map[int]string{0: "/share/c/x/m0", 2: "/share/c/x/m2"}, submounts: subs})
	if err != nil {
		t.Fatal(err)
	}
	var dsts []string
	for _, m := range got.Mounts {
		dsts = append(dsts, m.Destination+" "+m.Source+" "+strings.Join(m.Options, ","))
	}
	// rro is ro in the guest: the host shared its submounts read-only.
	want := []string{"/mnt /share/c/x/m0 rbind,ro", "/mnt/tmpfs /share/c/x/m0.0 rbind,rw", "/mnt/a/b /share/c/x/m0.1 rbind,ro",
		"/proc proc ", "/rro /share/c/x/m2 rbind,ro", "/rro/tmpfs /share/c/x/m2.0 rbind,ro"}
	if strings.Join(dsts, "|") != strings.Join(want, "|") {
		t.Errorf("mounts\n%q\nwant\n%q", dsts, want)
	}
	for _, bad := range []*api.Submount{{Subpath: "../escape", Path: "c/x/m0.0"}, {Subpath: "ok", Path: "../escape"}} {
		if _, err := sharedSubmounts("/share", []*api.SharedMount{{Index: 0, Path: "m0", Submounts: []*api.Submount{bad}}}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("submount %v: %v; want invalid argument", bad, err)
		}
	}
}
