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
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/network"
)

// A VM template is a guest booted once to agent-ready and saved: its RAM in
// a file and its device state in a migration stream. A clone maps the RAM
// file privately (copy-on-write, so every clone shares the template's
// pages) and loads the device state instead of booting: launch to agent
// ready in about a tenth of a cold boot under TCG. See docs/design.md
// "VM templates".

// DefaultTemplateDir is where the shim keeps VM templates.
const DefaultTemplateDir = "/var/lib/boxlite/templates"

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
	templateBuildGlob  = ".build-*"
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

// builds counts the templates this process built.
var builds atomic.Int64

// TemplateBuilds is how many templates this process has built.
func TemplateBuilds() int64 { return builds.Load() }

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

// migrationFD is the name under which the device state's descriptor is
// handed to QEMU.
const migrationFD = "template-state"

// migrate runs a migration command on the device state file f: the
// capability first (both ends need it), then the descriptor, then cmd.
func (q *QEMU) migrate(ctx context.Context, c *qmpClient, cmd string, f *os.File) error {
	if _, err := c.ExecuteArgs(ctx, "migrate-set-capabilities", ignoreShared); err != nil {
		return err
	}
	if err := c.SendFD(ctx, migrationFD, f); err != nil {
		return err
	}
	_, err := c.ExecuteArgs(ctx, cmd, map[string]string{"uri": "fd:" + migrationFD})
	return err
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

// lockFile takes an exclusive flock on path, waiting as long as ctx allows.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	got := make(chan error, 1)
	go func() { got <- unix.Flock(int(f.Fd()), unix.LOCK_EX) }()
	select {
	case err := <-got:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		return func() { f.Close() }, nil
	case <-ctx.Done():
		// The flock, once it is granted, is released with the file.
		go func() { <-got; f.Close() }()
		return nil, fmt.Errorf("wait for the template lock %s: %w", path, ctx.Err())
	}
}

// build boots a VM of cfg's shape to agent-ready, saves it into a new
// directory and publishes it under its key with one rename.
func (ts *Templates) build(ctx context.Context, cfg *Config, accel Accel, meta TemplateMeta) (err error) {
	began := time.Now()
	tmp, err := os.MkdirTemp(ts.Dir, ".build-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	share := filepath.Join(tmp, "share")
	if err := os.Mkdir(share, 0o700); err != nil {
		return err
	}
	use := &templateUse{role: roleBuild, memory: filepath.Join(tmp, templateMemory), state: filepath.Join(tmp, templateState)}
	if err := createSized(use.memory, int64(cfg.MemoryMiB)<<20); err != nil {
		return err
	}
	b := Config{
		Kernel: cfg.Kernel, Initrd: cfg.Initrd, QEMUBinary: cfg.QEMUBinary, Accel: accel,
		VCPUs: cfg.VCPUs, MemoryMiB: cfg.MemoryMiB, KernelArgs: cfg.KernelArgs,
		ConsoleLogMax: cfg.ConsoleLogMax, Share: share, StateDir: tmp, host: cfg.host,
		template: use,
	}
	cleanup, err := templateNICs(&b, meta.NICs)
	if err != nil {
		return err
	}
	defer cleanup()
	q, err := NewQEMU(b)
	if err != nil {
		return err
	}
	if err := q.Start(ctx); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = q.Kill()
		}
	}()
	if err := ts.Ready(ctx, q.AgentSocket()); err != nil {
		return fmt.Errorf("guest not ready: %w", err)
	}
	if err := q.save(ctx); err != nil {
		return err
	}
	if err := q.Stop(ctx); err != nil {
		return err
	}
	meta.Built, meta.BuildTime = time.Now().UTC(), time.Since(began)
	if err := publishTemplate(tmp, filepath.Join(ts.Dir, meta.Key), meta); err != nil {
		return err
	}
	builds.Add(1)
	return nil
}

// templateNICs gives a template build its NICs: the template's MACs, user
// networking without published ports, and taps of a namespace of its own.
func templateNICs(b *Config, kinds []string) (cleanup func(), err error) {
	cleanup = func() {}
	var macs []net.HardwareAddr
	for i, k := range kinds {
		if k == "tap" {
			macs = append(macs, templateMAC(i))
		}
	}
	var taps []*network.Tap
	if len(macs) > 0 {
		ns, err := netns.New()
		if err != nil {
			return cleanup, err
		}
		if taps, err = network.CreateTaps(ns, macs); err != nil {
			ns.Close()
			return cleanup, err
		}
		b.NetNS = ns
		cleanup = func() {
			for _, t := range taps {
				t.Close()
			}
			ns.Close()
		}
	}
	for i, k := range kinds {
		nic := NIC{MAC: templateMAC(i)}
		if k == "user" {
			nic.User = &UserNet{}
		} else {
			nic.Tap, taps = taps[0].File, taps[1:]
		}
		b.NICs = append(b.NICs, nic)
	}
	return cleanup, nil
}

// createSized creates path with size bytes (sparse).
func createSized(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// publishTemplate makes the built files durable and read-only, writes the
// meta and renames tmp to dir: a template is either absent or complete.
func publishTemplate(tmp, dir string, meta TemplateMeta) error {
	os.RemoveAll(filepath.Join(tmp, "share"))
	for _, name := range []string{templateMemory, templateState} {
		if err := syncFile(filepath.Join(tmp, name)); err != nil {
			return err
		}
	}
	st, err := os.ReadFile(filepath.Join(tmp, templateState))
	if err != nil {
		return err
	}
	sum := sha256.Sum256(st)
	meta.StateSHA256, meta.StateSize = hex.EncodeToString(sum[:]), int64(len(st))
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, templateMeta), b, 0o400); err != nil {
		return err
	}
	// Only the published files stay (the console log and the root QEMU
	// chrooted into go).
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	for _, e := range entries {
		switch e.Name() {
		case templateMemory, templateState, templateMeta:
			if err := os.Chmod(filepath.Join(tmp, e.Name()), 0o444); err != nil {
				return err
			}
		default:
			if err := os.RemoveAll(filepath.Join(tmp, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := syncFile(filepath.Join(tmp, templateMeta)); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o555); err != nil {
		return err
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return syncDir(filepath.Dir(dir))
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func syncDir(path string) error { return syncFile(path) }

// ignoreShared makes a migration leave the shared RAM file out: only
// device state goes through the stream (about 50 KB, not the guest's RAM).
// Both ends must set it.
var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// save migrates the running template build's device state into its state
// file; the RAM stays in the shared file. Migration stops the guest at the
// end, at one instant for RAM and devices, and records that it was running,
// so a clone runs as soon as its stream is loaded.
func (q *QEMU) save(ctx context.Context) error {
	c, err := dialQMP(ctx, q.qmpPath)
	if err != nil {
		return err
	}
	defer c.Close()
	f, err := os.OpenFile(q.cfg.template.state, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	err = q.migrate(ctx, c, "migrate", f)
	f.Close()
	if err != nil {
		return err
	}
	for {
		r, err := c.Execute(ctx, "query-migrate")
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(r, &st); err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("save device state: migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// restore starts loading a clone's device state. The guest resumes by
// itself once it is loaded; a stream QEMU cannot load makes it exit, which
// the caller sees as a guest that died before its agent answered.
func (q *QEMU) restore(ctx context.Context) error {
	c, err := dialQMP(ctx, q.qmpPath)
	if err != nil {
		return err
	}
	defer c.Close()
	f, err := os.Open(q.cfg.template.state)
	if err != nil {
		return err
	}
	defer f.Close()
	return q.migrate(ctx, c, "migrate-incoming", f)
}

// removeStaleTemplates removes the templates whose files changed and the
// leftovers of builds that died (their lock is free).
func removeStaleTemplates(root string) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range entries {
		path := filepath.Join(root, e.Name())
		switch {
		case strings.HasPrefix(e.Name(), templateLockPrefix):
			continue
		case strings.HasPrefix(e.Name(), ".build-"):
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = removeTemplateDir(path)
			}
		default:
			m, err := ReadTemplateMeta(path)
			if err == nil && m.Stale() {
				log.L.WithField("template", m.Key).Info("removing stale VM template")
				_ = RemoveTemplate(root, m.Key)
			}
		}
	}
}

// ReadTemplateMeta reads the meta of the template in dir.
func ReadTemplateMeta(dir string) (TemplateMeta, error) {
	var m TemplateMeta
	b, err := os.ReadFile(filepath.Join(dir, templateMeta))
	if err != nil {
		return m, err
	}
	err = json.Unmarshal(b, &m)
	return m, err
}

// ListTemplates returns the metas of the templates under root, with the
// size of each (the blocks its files take).
func ListTemplates(root string) ([]TemplateMeta, []int64, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	var metas []TemplateMeta
	var sizes []int64
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() {
			continue
		}
		m, err := ReadTemplateMeta(filepath.Join(root, e.Name()))
		if err != nil {
			m = TemplateMeta{Key: e.Name()}
		}
		metas = append(metas, m)
		sizes = append(sizes, diskUsage(filepath.Join(root, e.Name())))
	}
	return metas, sizes, nil
}

func diskUsage(dir string) int64 {
	var n int64
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, e.Name()), &st) == nil {
			n += st.Blocks * 512
		}
	}
	return n
}

// RemoveTemplate removes the template key under root, under its builders'
// lock. Clones running from it keep their mappings of its files.
func RemoveTemplate(root, key string) error {
	if key == "" || strings.ContainsAny(key, "/.") {
		return fmt.Errorf("template %q: not a template key", key)
	}
	dir := filepath.Join(root, key)
	if fi, err := os.Lstat(dir); err != nil {
		return err
	} else if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory: refused", dir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	unlock, err := lockFile(ctx, filepath.Join(root, templateLockPrefix+key))
	if err != nil {
		return err
	}
	defer unlock()
	// The lock file stays: a builder waiting on it must not end up
	// holding the lock of a file a newcomer no longer finds.
	return removeTemplateDir(dir)
}

// removeTemplateDir removes a template or build directory, made writable
// again first (published ones are 0555: only root could remove them as
// they are). A symlink is removed, never followed.
func removeTemplateDir(dir string) error {
	if fi, err := os.Lstat(dir); err == nil && fi.IsDir() {
		_ = os.Chmod(dir, 0o700)
	}
	return os.RemoveAll(dir)
}
