package shim

import (
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/share"
)

// shareDirName is the box's share, in its VM state directory.
const shareDirName = "share"

// boxShare is what a container takes from the box's share: its rootfs and
// the sources of its bind mounts, as paths inside the share.
type boxShare struct {
	// rootfs is the rootfs's path in the share.
	rootfs string
	// mounts are the spec's bind mounts, by index, in the share.
	mounts []*api.SharedMount
}

// shareContainer binds a container's rootfs and the source of every bind
// mount of its spec into the share: under dir (c/<id>) the rootfs as
// "rootfs" and mount i as "m<i>". Other mounts (tmpfs, proc, sysfs, devpts,
// mqueue, cgroup...) are made in the guest and need nothing from the host,
// and so is a pod's /dev/shm (the mounts listed in skip). A bind mount is
// read-only on the host side too when its options say ro, so even QEMU
// cannot write through it.
//
// The submounts of an rbind's source are shared each on its own, as
// m<i>.<k>, and the guest binds them at their place: binding the source
// recursively would make each submount's directory a mount point in the
// host's mount namespace, and the host could not remove it (rmdir: EBUSY)
// while the box runs. A submount is read-only when the bind says rro (ro
// alone leaves submounts as they are, as with runc) or when it is
// read-only on the host.
func shareContainer(sh *share.Share, dir, rootfs string, spec *specs.Spec, skip []uint32) (*boxShare, error) {
	out := &boxShare{rootfs: path.Join(dir, "rootfs")}
	if err := sh.Add(share.Bind{Source: rootfs, Path: out.rootfs, Recursive: true}); err != nil {
		return nil, fmt.Errorf("share rootfs: %w", err)
	}
	for i, m := range spec.Mounts {
		if !isBindMount(m) || slices.Contains(skip, uint32(i)) {
			continue
		}
		sm, err := shareMount(sh, path.Join(dir, fmt.Sprintf("m%d", i)), m)
		if err != nil {
			return nil, fmt.Errorf("mount %s: %w", m.Destination, err)
		}
		sm.Index = uint32(i)
		out.mounts = append(out.mounts, sm)
	}
	return out, nil
}

// shareMount binds the source of bind mount m at p in the share, and the
// submounts of an rbind at p.<k>.
func shareMount(sh *share.Share, p string, m specs.Mount) (*api.SharedMount, error) {
	rro := slices.Contains(m.Options, "rro")
	// Mounts made on the host under an rslave or rshared volume reach the
	// guest (the other way round 9p cannot go).
	slave := slices.ContainsFunc(m.Options, func(o string) bool {
		return o == "rslave" || o == "slave" || o == "rshared" || o == "shared"
	})
	b := share.Bind{Source: m.Source, Path: p, ReadOnly: readOnly(m.Options) || rro, Slave: slave}
	if err := sh.Add(b); err != nil {
		return nil, err
	}
	sm := &api.SharedMount{Path: p}
	if !slices.Contains(m.Options, "rbind") {
		return sm, nil
	}
	subs, err := submounts(m.Source)
	if err != nil {
		return nil, err
	}
	for k, sub := range subs {
		sp := fmt.Sprintf("%s.%d", p, k)
		ro := rro || sub.readOnly
		if err := sh.Add(share.Bind{Source: filepath.Join(m.Source, sub.path), Path: sp, ReadOnly: ro, Slave: slave}); err != nil {
			return nil, fmt.Errorf("submount %s: %w", sub.path, err)
		}
		sm.Submounts = append(sm.Submounts, &api.Submount{Subpath: sub.path, Path: sp, ReadOnly: ro})
	}
	return sm, nil
}

// isBindMount says a spec mount is a bind mount of a host path: of type
// bind, or with the bind or rbind option (runc's rule).
func isBindMount(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// readOnly says mount options end up read-only: the last of ro and rw wins.
func readOnly(options []string) bool {
	ro := false
	for _, o := range options {
		switch o {
		case "ro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}

// submount is a mount under a bind mount's source.
type submount struct {
	// path is relative to the source.
	path string
	// readOnly says it is mounted read-only on the host.
	readOnly bool
}

// submounts lists the mounts strictly under the host path source, outermost
// first.
func submounts(source string) ([]submount, error) {
	src, err := filepath.EvalSymlinks(source)
	if err != nil {
		return nil, err
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(src))
	if err != nil {
		return nil, fmt.Errorf("submounts of %s: %w", source, err)
	}
	var out []submount
	for _, mi := range infos {
		rel, err := filepath.Rel(src, mi.Mountpoint)
		if err != nil || rel == "." || !filepath.IsLocal(rel) ||
			slices.ContainsFunc(out, func(s submount) bool { return s.path == rel }) {
			continue
		}
		out = append(out, submount{path: rel, readOnly: slices.Contains(strings.Split(mi.Options, ","), "ro")})
	}
	slices.SortStableFunc(out, func(a, b submount) int { return strings.Count(a.path, "/") - strings.Count(b.path, "/") })
	return out, nil
}
