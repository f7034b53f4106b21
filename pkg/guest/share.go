package guest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// shareDir is where share tag is mounted.
func (a *Agent) shareDir(tag string) string { return filepath.Join(a.cfg.stateDir, "shares", tag) }

// share returns where share tag is mounted, mounting it on first use. A 9p
// share can be mounted once: every container of the box takes its rootfs
// and bind mount sources from this one mount.
func (a *Agent) share(tag string) (string, error) {
	if err := validateID("share tag", tag); err != nil {
		return "", err
	}
	a.shareMu.Lock()
	defer a.shareMu.Unlock()
	dir := a.shareDir(tag)
	if a.shares[tag] {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	if err := mount9p(tag, dir); err != nil {
		os.Remove(dir)
		return "", err
	}
	a.shares[tag] = true
	return dir, nil
}

// sharePath returns the guest path of rel inside the share mounted at dir.
// rel must be a local path: relative, without "..", not empty.
func sharePath(dir, what, rel string) (string, error) {
	if !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%s %q must be a relative path inside the share: %w", what, rel, errdefs.ErrInvalidArgument)
	}
	return filepath.Join(dir, rel), nil
}

// bindRootfs bind-mounts the rootfs directory src (in the share) on target.
func bindRootfs(src, target string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("rootfs %s in the share: %w", src, errdefs.ErrNotFound)
	}
	if !st.IsDir() {
		return fmt.Errorf("rootfs %s in the share is not a directory: %w", src, errdefs.ErrInvalidArgument)
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind rootfs %s on %s: %w", src, target, err)
	}
	return nil
}

// sharedSources maps each listed spec mount (by index) to its source in the
// share mounted at dir.
func sharedSources(dir string, mounts []*api.SharedMount) (map[int]string, error) {
	out := make(map[int]string, len(mounts))
	for _, m := range mounts {
		p, err := sharePath(dir, fmt.Sprintf("shared mount %d path", m.GetIndex()), m.GetPath())
		if err != nil {
			return nil, err
		}
		if _, dup := out[int(m.GetIndex())]; dup {
			return nil, fmt.Errorf("mount %d is shared twice: %w", m.GetIndex(), errdefs.ErrInvalidArgument)
		}
		out[int(m.GetIndex())] = p
	}
	return out, nil
}

// isBind says a spec mount is a bind mount: of type bind, or with the bind
// or rbind option (the type may then be anything, even empty).
func isBind(typ string, options []string) bool {
	return typ == "bind" || slices.Contains(options, "bind") || slices.Contains(options, "rbind")
}

// guestSubmount is a host submount of a shared mount, in the guest.
type guestSubmount struct {
	// subpath is relative to the mount's destination.
	subpath string
	// source is its guest path in the share.
	source   string
	readOnly bool
}

// sharedSubmounts returns, by spec mount index, the host's submounts the
// host shared under each shared mount, with their guest sources in the
// share mounted at dir. Paths must be local.
func sharedSubmounts(dir string, mounts []*api.SharedMount) (map[int][]guestSubmount, error) {
	out := map[int][]guestSubmount{}
	for _, m := range mounts {
		for _, sub := range m.GetSubmounts() {
			if !filepath.IsLocal(sub.GetSubpath()) {
				return nil, fmt.Errorf("submount %q of shared mount %d must be a relative path inside it: %w", sub.GetSubpath(), m.GetIndex(), errdefs.ErrInvalidArgument)
			}
			src, err := sharePath(dir, fmt.Sprintf("submount %s of shared mount %d", sub.GetSubpath(), m.GetIndex()), sub.GetPath())
			if err != nil {
				return nil, err
			}
			out[int(m.GetIndex())] = append(out[int(m.GetIndex())], guestSubmount{subpath: sub.GetSubpath(), source: src, readOnly: sub.GetReadOnly()})
		}
	}
	return out, nil
}

// rewriteMounts sets the source of every bind mount in mounts (the spec's
// "mounts" array) to its place in the share. A bind mount the host did not
// share names a host path, which means nothing here: it is an error, as is
// a shared index that is not a bind mount. After a mount with submounts,
// a bind of each follows at its place, read-only or not as the host says.
func rewriteMounts(doc map[string]json.RawMessage, shared map[int]string, subs map[int][]guestSubmount) error {
	raw, ok := doc["mounts"]
	if !ok || string(raw) == "null" {
		if len(shared) > 0 {
			return fmt.Errorf("%d shared mounts but the spec has no mounts: %w", len(shared), errdefs.ErrInvalidArgument)
		}
		return nil
	}
	var mounts []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &mounts); err != nil {
		return fmt.Errorf("spec mounts is not a list of objects: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	for i := range shared {
		if i < 0 || i >= len(mounts) {
			return fmt.Errorf("shared mount %d: the spec has %d mounts: %w", i, len(mounts), errdefs.ErrInvalidArgument)
		}
	}
	out := make([]map[string]json.RawMessage, 0, len(mounts))
	for i, m := range mounts {
		var typ, dst string
		var opts []string
		_ = json.Unmarshal(m["type"], &typ)
		_ = json.Unmarshal(m["destination"], &dst)
		if err := json.Unmarshal(m["options"], &opts); m["options"] != nil && err != nil {
			return fmt.Errorf("spec mount %d options: %v: %w", i, err, errdefs.ErrInvalidArgument)
		}
		src, listed := shared[i]
		switch {
		case listed && !isBind(typ, opts):
			return fmt.Errorf("shared mount %d (%s) is not a bind mount: %w", i, dst, errdefs.ErrInvalidArgument)
		case !listed && isBind(typ, opts):
			return fmt.Errorf("bind mount %d (%s) names a host path the host did not share: %w", i, dst, errdefs.ErrInvalidArgument)
		case listed:
			if err := setField(m, "source", src); err != nil {
				return err
			}
			// The host shared the submounts on their own (read-only
			// with rro): in the guest "rro" is "ro".
			if i := slices.Index(opts, "rro"); i >= 0 {
				opts[i] = "ro"
				if err := setField(m, "options", opts); err != nil {
					return err
				}
			}
		}
		out = append(out, m)
		for _, sub := range subs[i] {
			if !listed {
				return fmt.Errorf("mount %d (%s) has submounts but is not shared: %w", i, dst, errdefs.ErrInvalidArgument)
			}
			mode := "rw"
			if sub.readOnly {
				mode = "ro"
			}
			w := map[string]json.RawMessage{}
			for k, v := range map[string]any{"destination": filepath.Join(dst, sub.subpath), "type": "bind",
				"source": sub.source, "options": []string{"rbind", mode}} {
				if err := setField(w, k, v); err != nil {
					return err
				}
			}
			out = append(out, w)
		}
	}
	data, err := json.Marshal(out)
	if err != nil {
		return fmt.Errorf("encode mounts: %w", err)
	}
	doc["mounts"] = data
	return nil
}
