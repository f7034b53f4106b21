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
// "rootfs" and mount i as "m<i>". Other mounts (tmpfs, proc, sysfs, devpts, mqueue,
// cgroup...) are made in the guest and need nothing from the host, and so
// is a pod's /dev/shm (the mounts listed in skip). A bind mount is
// recursive on the host side when its options say rbind, and read-only
// there too when they say ro (its submounts too with rro), so even QEMU
// cannot write through it. The guest sees a recursive bind as one 9p
// tree, so the submounts of an "ro" (not "rro") bind, which stay
// writable as with runc, are listed for the guest to bind writable again.
func shareContainer(sh *share.Share, dir, rootfs string, spec *specs.Spec, skip []uint32) (*boxShare, error) {
	out := &boxShare{rootfs: path.Join(dir, "rootfs")}
	if err := sh.Add(share.Bind{Source: rootfs, Path: out.rootfs, Recursive: true}); err != nil {
		return nil, fmt.Errorf("share rootfs: %w", err)
	}
	for i, m := range spec.Mounts {
		if !isBindMount(m) || slices.Contains(skip, uint32(i)) {
			continue
		}
		p := path.Join(dir, fmt.Sprintf("m%d", i))
		rro := slices.Contains(m.Options, "rro")
		b := share.Bind{
			Source:            m.Source,
			Path:              p,
			Recursive:         slices.Contains(m.Options, "rbind"),
			ReadOnly:          readOnly(m.Options),
			RecursiveReadOnly: rro,
			// Mounts made on the host under an rslave or rshared volume
			// reach the guest (the other way round 9p cannot go).
			Slave: slices.ContainsFunc(m.Options, func(o string) bool {
				return o == "rslave" || o == "slave" || o == "rshared" || o == "shared"
			}),
		}
		if err := sh.Add(b); err != nil {
			return nil, fmt.Errorf("mount %s: %w", m.Destination, err)
		}
		sm := &api.SharedMount{Index: uint32(i), Path: p}
		if b.Recursive && b.ReadOnly && !rro {
			subs, err := submounts(m.Source)
			if err != nil {
				return nil, fmt.Errorf("mount %s: %w", m.Destination, err)
			}
			sm.Writable = subs
		}
		out.mounts = append(out.mounts, sm)
	}
	return out, nil
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

// submounts lists the mount points strictly under the host path source,
// relative to it, outermost first.
func submounts(source string) ([]string, error) {
	src, err := filepath.EvalSymlinks(source)
	if err != nil {
		return nil, err
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(src))
	if err != nil {
		return nil, fmt.Errorf("submounts of %s: %w", source, err)
	}
	var out []string
	for _, mi := range infos {
		rel, err := filepath.Rel(src, mi.Mountpoint)
		if err != nil || rel == "." || !filepath.IsLocal(rel) || slices.Contains(out, rel) {
			continue
		}
		out = append(out, rel)
	}
	slices.SortStableFunc(out, func(a, b string) int { return strings.Count(a, "/") - strings.Count(b, "/") })
	return out, nil
}
