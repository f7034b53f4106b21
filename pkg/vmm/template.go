package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// A VM template is a guest booted once to agent-ready and saved: its RAM in
// a file and its device state in a migration stream. A clone maps the RAM
// file privately (copy-on-write, so every clone shares the template's
// pages) and loads the device state instead of booting: launch to agent
// ready in about a tenth of a cold boot under TCG. See docs/design.md
// "VM templates".

// DefaultTemplateDir is where the shim keeps VM templates.
const DefaultTemplateDir = "/var/lib/boxlite/templates"

// TemplateDirEnv, when set, is the template directory the shim and
// `boxlite template` use instead of DefaultTemplateDir.
const TemplateDirEnv = "BOXLITE_TEMPLATE_DIR"

// TemplateDir is the template directory: $BOXLITE_TEMPLATE_DIR, else
// DefaultTemplateDir.
func TemplateDir() string {
	if d := os.Getenv(TemplateDirEnv); d != "" {
		return d
	}
	return DefaultTemplateDir
}

// templateFormat versions the layout and the clone's arguments: a change to
// either gives every shape a new key, so old templates are never loaded.
const templateFormat = 1

// Files of a published template directory.
const (
	templateMemory = "memory"
	templateState  = "state"
	templateMeta   = "meta.json"
	// templateLockPrefix + key is the lock a template's builders take.
	templateLockPrefix = ".lock-"
	// templateBuildPrefix starts the directory a template is built in.
	templateBuildPrefix = ".build-"
)

// Templates turns VM templates on for a Config.
type Templates struct {
	// Dir holds the templates, one directory per shape key. Created 0700
	// if missing.
	Dir string
	// Ready blocks until a guest booted to become a template is ready to
	// be saved (its agent answers), bounded by ctx. It must not change the
	// guest's state in a way every clone would inherit.
	Ready func(ctx context.Context, agentSocket string) error
}

// templateRole says what a VM does with a template.
type templateRole int

const (
	roleBuild templateRole = iota + 1
	roleClone
)

// templateUse is how a VM uses a template: as the VM that builds it (RAM
// file shared, device state saved) or as a clone (RAM file private, device
// state loaded).
type templateUse struct {
	role templateRole
	// memory is the RAM file.
	memory string
	// state is the device state file.
	state string
}

// TemplateMeta describes a published template (its meta.json).
type TemplateMeta struct {
	Key    string `json:"key"`
	Format int    `json:"format"`
	// Files are the identities (device, inode, size, modification time)
	// of the QEMU binary, kernel and initrd it was built from, by path.
	Files     map[string]string `json:"files"`
	Accel     Accel             `json:"accel"`
	MemoryMiB int               `json:"memory_mib"`
	VCPUs     int               `json:"vcpus"`
	// NICs are the kinds of the NICs in order ("tap" or "user").
	NICs []string `json:"nics,omitempty"`
	// Args are QEMU's arguments with the per-box values left out.
	Args []string `json:"args"`
	// StateSHA256 and StateSize check the device state file.
	StateSHA256 string        `json:"state_sha256"`
	StateSize   int64         `json:"state_size"`
	Built       time.Time     `json:"built"`
	BuildTime   time.Duration `json:"build_time_ns"`
}

// Stale says a file the template was built from changed or is gone: its key
// can never be asked for again.
func (m *TemplateMeta) Stale() bool {
	for path, id := range m.Files {
		if cur, err := fileIdentity(path); err != nil || cur != id {
			return true
		}
	}
	return false
}

// template is a published template a clone can use.
type template struct {
	dir  string
	meta TemplateMeta
}

// templateMAC is NIC i's address in every template, and so in every clone
// until its agent sets the box's own (ConfigureNetwork's device_mac is this
// one then): locally administered, "blt" then the index.
func templateMAC(i int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x62, 0x6c, 0x74, 0x00, byte(i)}
}

// fileIdentity identifies a file's content cheaply: any replacement or
// rewrite changes its inode, size or modification time.
func fileIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	return fmt.Sprintf("%d:%d:%d:%d.%09d", st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec), nil
}

// templateShape is the template a validated config would use: its key and
// the meta it is published with (without the state's checksum). Everything
// a restore needs to match goes into the key: QEMU's binary, the kernel,
// the initrd, and QEMU's arguments (memory, vCPUs, accelerator and CPU
// model, command line, devices and NIC kinds), with what differs between
// boxes (share path, descriptors, published ports, MACs) left out.
func templateShape(cfg *Config, accel Accel) (TemplateMeta, error) {
	m := TemplateMeta{Format: templateFormat, Files: map[string]string{}, Accel: accel,
		MemoryMiB: cfg.MemoryMiB, VCPUs: cfg.VCPUs}
	for _, p := range []string{cfg.QEMUBinary, cfg.Kernel, cfg.Initrd} {
		// Absolute, so that Stale means the same from any directory.
		p, err := filepath.Abs(p)
		if err != nil {
			return m, err
		}
		id, err := fileIdentity(p)
		if err != nil {
			return m, err
		}
		m.Files[p] = id
	}
	n := *cfg
	n.Share, n.StateDir, n.NetNS = "/template/share", "/template", nil
	n.NICs = make([]NIC, len(cfg.NICs))
	for i, nic := range cfg.NICs {
		n.NICs[i].MAC = templateMAC(i)
		kind := "tap"
		if nic.User != nil {
			kind, n.NICs[i].User = "user", &UserNet{}
		}
		m.NICs = append(m.NICs, kind)
	}
	n.template = &templateUse{role: roleClone, memory: "/template/" + templateMemory}
	m.Args = qemuArgs(&n, accel, assignFDs(n.NICs))
	h := sha256.New()
	enc := json.NewEncoder(h)
	if err := enc.Encode(m); err != nil {
		return m, err
	}
	m.Key = hex.EncodeToString(h.Sum(nil))[:16]
	return m, nil
}

// assignFDs numbers the descriptors launch gives QEMU (ExtraFiles start at
// 3): QMP, agent, then the taps in NIC order.
func assignFDs(nics []NIC) launchFDs {
	fds := launchFDs{qmp: 3, agent: 4}
	next := 5
	for _, n := range nics {
		fd := -1
		if n.User == nil {
			fd, next = next, next+1
		}
		fds.taps = append(fds.taps, fd)
	}
	return fds
}

// ensureTemplate returns the template of cfg's shape, building it first if
// there is none (once, however many ask at the same time). A template that
// cannot be trusted (changed, truncated, writable by a clone) is removed and
// built again.
func (ts *Templates) ensure(ctx context.Context, cfg *Config, accel Accel) (*template, error) {
	shape, err := templateShape(cfg, accel)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(ts.Dir, shape.Key)
	t, err := openTemplate(dir, shape.Key)
	if err == nil {
		return t, nil
	}
	if err := os.MkdirAll(ts.Dir, 0o700); err != nil {
		return nil, err
	}
	unlock, err := lockFile(ctx, filepath.Join(ts.Dir, templateLockPrefix+shape.Key))
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Another process may have built it while we waited.
	if t, err = openTemplate(dir, shape.Key); err == nil {
		return t, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("template", shape.Key).Warn("VM template unusable: building it again")
		if err := removeTemplateDir(dir); err != nil {
			return nil, err
		}
	}
	if err := ts.build(ctx, cfg, accel, shape); err != nil {
		return nil, fmt.Errorf("build VM template %s: %w", shape.Key, err)
	}
	removeStaleTemplates(ts.Dir)
	return openTemplate(dir, shape.Key)
}

// openTemplate checks a published template: its meta names key, its files
// are what it says, and nobody but their owner, this process's user, can
// write to them (a clone maps the RAM file, and whoever could write it could
// write into every clone's memory).
func openTemplate(dir, key string) (*template, error) {
	if err := checkNotWritable(dir, true); err != nil {
		return nil, err
	}
	if err := checkNotWritable(filepath.Join(dir, templateMeta), false); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, templateMeta))
	if err != nil {
		return nil, err
	}
	t := &template{dir: dir}
	if err := json.Unmarshal(b, &t.meta); err != nil {
		return nil, fmt.Errorf("%s: %w", templateMeta, err)
	}
	if t.meta.Key != key || t.meta.Format != templateFormat {
		return nil, fmt.Errorf("%s is of template %s format %d", templateMeta, t.meta.Key, t.meta.Format)
	}
	mem := filepath.Join(dir, templateMemory)
	if err := checkNotWritable(mem, false); err != nil {
		return nil, err
	}
	if st, err := os.Stat(mem); err != nil {
		return nil, err
	} else if st.Size() != int64(t.meta.MemoryMiB)<<20 {
		return nil, fmt.Errorf("%s is %d bytes, want %d", mem, st.Size(), int64(t.meta.MemoryMiB)<<20)
	}
	if err := checkState(filepath.Join(dir, templateState), t.meta); err != nil {
		return nil, err
	}
	return t, nil
}

// checkNotWritable refuses a template file or directory that anyone but its
// owner could write to, or that another user owns.
func checkNotWritable(path string, dir bool) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	switch {
	case dir != isDir || (!dir && st.Mode&unix.S_IFMT != unix.S_IFREG):
		return fmt.Errorf("%s: not a regular %s", path, map[bool]string{true: "directory", false: "file"}[dir])
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is owned by uid %d, not %d: refused", path, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return fmt.Errorf("%s has mode %#o: others could write into every clone, refused", path, st.Mode&0o7777)
	}
	return nil
}

// checkState verifies the device state against its checksum: a clone
// cannot tell a damaged stream from a good one before QEMU loads it.
func checkState(path string, m TemplateMeta) error {
	if err := checkNotWritable(path, false); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	if n != m.StateSize || hex.EncodeToString(h.Sum(nil)) != m.StateSHA256 {
		return fmt.Errorf("%s: %d bytes, checksum mismatch (want %d bytes): damaged", path, n, m.StateSize)
	}
	return nil
}
