package guest

import (
	"encoding/json"
	"fmt"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const (
	// maxSpecSize bounds CreateContainerRequest.spec.
	maxSpecSize = 1 << 20
	// maxProcessSize bounds ExecProcessRequest.process.
	maxProcessSize = 256 << 10
	// maxIDLength bounds container, exec and tag names. containerd allows
	// 76 characters and nerdctl's exec ids have 69 ("exec-" and 64 hex
	// digits); the names become path elements (NAME_MAX is 255), so the
	// bound is generous but keeps "exec-<id>.pid" far below NAME_MAX.
	maxIDLength = 128
)

// validateID checks that id is a safe name for a container, an exec or a
// mount tag: 1 to maxIDLength characters of [A-Za-z0-9_.-], and not "." or
// "..", so it can be used as a path element.
func validateID(kind, id string) error {
	if id == "" || len(id) > maxIDLength {
		return fmt.Errorf("%s %q must be 1 to %d characters: %w", kind, id, maxIDLength, errdefs.ErrInvalidArgument)
	}
	if id == "." || id == ".." {
		return fmt.Errorf("%s %q is not a valid name: %w", kind, id, errdefs.ErrInvalidArgument)
	}
	for _, r := range id {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '-'
		if !ok {
			return fmt.Errorf("%s %q may only contain [A-Za-z0-9_.-]: %w", kind, id, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// specEdit says how the agent rewrites the host's spec for the guest.
type specEdit struct {
	// rootPath replaces root.path: the guest mount of the rootfs.
	rootPath string
	// cgroupsPath replaces linux.cgroupsPath.
	cgroupsPath string
	// terminal replaces process.terminal: the agent decides how stdio is set.
	terminal bool
	// sources are the guest sources of the spec's bind mounts, by index in
	// mounts: every bind mount must have one.
	sources map[int]string
	// submounts are, by index in mounts, the host's submounts of a bind
	// mount's source, bound at their place after it.
	submounts map[int][]guestSubmount
	// joins are the guest namespaces (by type, as /proc paths) that replace
	// the host paths of the spec's namespaces of those types.
	joins map[string]string
}

// rewriteSpec rewrites an OCI spec from the host for the guest and returns it
// with its decoded form. Host-only fields are rewritten: hooks are dropped
// (they are host commands, run by the host), bind mount sources are moved
// into the share, linux.cgroupsPath is set, namespace paths are dropped
// (their types kept) or replaced by the guest namespaces a pod's container
// joins, root.path and process.terminal are set.
// Everything else, including fields this agent does not know, is kept as is.
func rewriteSpec(data []byte, edit specEdit) ([]byte, *specs.Spec, error) {
	if len(data) > maxSpecSize {
		return nil, nil, fmt.Errorf("spec of %d bytes exceeds %d: %w", len(data), maxSpecSize, errdefs.ErrInvalidArgument)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil || doc == nil {
		return nil, nil, fmt.Errorf("spec is not a JSON object: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if raw, ok := doc["process"]; !ok || string(raw) == "null" {
		return nil, nil, fmt.Errorf("spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	delete(doc, "hooks")
	if err := rewriteMounts(doc, edit.sources, edit.submounts); err != nil {
		return nil, nil, err
	}
	if err := clampVersion(doc); err != nil {
		return nil, nil, err
	}
	if err := editObject(doc, "root", func(root map[string]json.RawMessage) error {
		return setField(root, "path", edit.rootPath)
	}); err != nil {
		return nil, nil, err
	}
	if err := editObject(doc, "process", func(p map[string]json.RawMessage) error {
		return setField(p, "terminal", edit.terminal)
	}); err != nil {
		return nil, nil, err
	}
	if err := editObject(doc, "linux", func(linux map[string]json.RawMessage) error {
		if err := setField(linux, "cgroupsPath", edit.cgroupsPath); err != nil {
			return err
		}
		return setNamespacePaths(linux, edit.joins)
	}); err != nil {
		return nil, nil, err
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return nil, nil, fmt.Errorf("encode spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(out, &spec); err != nil {
		return nil, nil, fmt.Errorf("spec does not decode: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if len(spec.Process.Args) == 0 && spec.Process.CommandLine == "" {
		return nil, nil, fmt.Errorf("spec process has no args: %w", errdefs.ErrInvalidArgument)
	}
	return out, &spec, nil
}

// guestSpecVersion is the newest runtime-spec version the guest's runtime
// accepts: crun 1.8.1 (Debian 12) refuses anything above 1.1.x with "unknown
// version specified", while containerd 2.4 writes 1.3.0. The fields that
// containerd sets are understood by both, and unknown ones are ignored.
const guestSpecVersion = "1.1.0"

// clampVersion lowers ociVersion to guestSpecVersion when it is newer.
func clampVersion(doc map[string]json.RawMessage) error {
	raw, ok := doc["ociVersion"]
	if !ok {
		return nil // the runtime decides
	}
	var v string
	if err := json.Unmarshal(raw, &v); err != nil {
		return fmt.Errorf("spec ociVersion is not a string: %w", errdefs.ErrInvalidArgument)
	}
	var major, minor int
	if _, err := fmt.Sscanf(v, "%d.%d", &major, &minor); err != nil {
		return fmt.Errorf("spec ociVersion %q is not a version: %w", v, errdefs.ErrInvalidArgument)
	}
	if major != 1 {
		return fmt.Errorf("spec ociVersion %q: only 1.x is supported: %w", v, errdefs.ErrInvalidArgument)
	}
	if minor > 1 {
		return setField(doc, "ociVersion", guestSpecVersion)
	}
	return nil
}

// editObject decodes the object doc[key] (an empty one when absent), lets fn
// edit it, and stores it back.
func editObject(doc map[string]json.RawMessage, key string, fn func(map[string]json.RawMessage) error) error {
	obj := map[string]json.RawMessage{}
	if raw, ok := doc[key]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
			return fmt.Errorf("spec %s is not an object: %v: %w", key, err, errdefs.ErrInvalidArgument)
		}
	}
	if err := fn(obj); err != nil {
		return err
	}
	raw, err := json.Marshal(obj)
	if err != nil {
		return fmt.Errorf("encode spec %s: %w", key, err)
	}
	doc[key] = raw
	return nil
}

// setField stores v, JSON-encoded, as obj[key].
func setField(obj map[string]json.RawMessage, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	obj[key] = raw
	return nil
}

// setNamespacePaths rewrites the path of every namespace in
// linux.namespaces: a path names a namespace of the host, so the guest
// runtime joins the guest namespace joins gives for its type (a pod's
// shared namespace) or else creates a new namespace of the same type. Every
// joined type must be in the spec with a path. It also adds a cgroup
// namespace when there is none.
func setNamespacePaths(linux map[string]json.RawMessage, joins map[string]string) error {
	raw, ok := linux["namespaces"]
	if !ok || string(raw) == "null" {
		if len(joins) > 0 {
			return fmt.Errorf("the spec has no namespaces but the host asked to join the pod's: %w", errdefs.ErrInvalidArgument)
		}
		return nil
	}
	var nss []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &nss); err != nil {
		return fmt.Errorf("spec linux.namespaces is not a list of objects: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	hasCgroup := false
	joined := map[string]bool{}
	for _, ns := range nss {
		var typ, path string
		_ = json.Unmarshal(ns["type"], &typ)
		_ = json.Unmarshal(ns["path"], &path)
		delete(ns, "path")
		if typ == "cgroup" {
			hasCgroup = true
		}
		if guestPath, ok := joins[typ]; ok && path != "" {
			if err := setField(ns, "path", guestPath); err != nil {
				return err
			}
			joined[typ] = true
		}
	}
	for typ := range joins {
		if !joined[typ] {
			return fmt.Errorf("the spec does not share its %s namespace (no %s namespace with a path) but the host asked to join the pod's: %w", typ, typ, errdefs.ErrInvalidArgument)
		}
	}
	if !hasCgroup {
		// The guest is cgroup v2 only: give the container its own cgroup
		// namespace, as containerd does on a v2 host, so /sys/fs/cgroup
		// in the container shows its own cgroup instead of nothing.
		nss = append(nss, map[string]json.RawMessage{"type": json.RawMessage(`"cgroup"`)})
	}
	out, err := json.Marshal(nss)
	if err != nil {
		return fmt.Errorf("encode namespaces: %w", err)
	}
	linux["namespaces"] = out
	return nil
}

// decodeProcess decodes an exec's OCI process from the host.
func decodeProcess(data []byte, terminal bool) (*specs.Process, error) {
	if len(data) > maxProcessSize {
		return nil, fmt.Errorf("process of %d bytes exceeds %d: %w", len(data), maxProcessSize, errdefs.ErrInvalidArgument)
	}
	var p specs.Process
	if err := json.Unmarshal(data, &p); err != nil {
		return nil, fmt.Errorf("process is not valid JSON: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if len(p.Args) == 0 && p.CommandLine == "" {
		return nil, fmt.Errorf("process has no args: %w", errdefs.ErrInvalidArgument)
	}
	p.Terminal = terminal
	return &p, nil
}
