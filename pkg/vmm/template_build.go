package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/netns"
	"github.com/boxlite/boxlite/pkg/network"
)

// Building a template: boot, save, publish; and a clone's restore.

// BuildTemplate makes sure the template of cfg's shape exists in
// cfg.Templates.Dir, building it if there is none, and returns its meta.
// cfg is validated as NewQEMU does (its Share and StateDir must exist, and
// nothing is started in them).
func BuildTemplate(ctx context.Context, cfg Config) (TemplateMeta, error) {
	if cfg.Templates == nil || cfg.Templates.Ready == nil {
		return TemplateMeta{}, errors.New("build template: no template directory or readiness check")
	}
	q, err := NewQEMU(cfg)
	if err != nil {
		return TemplateMeta{}, err
	}
	t, err := q.cfg.Templates.ensure(ctx, &q.cfg, q.accel)
	if err != nil {
		return TemplateMeta{}, err
	}
	return t.meta, nil
}

// builds counts the templates this process built.
var builds atomic.Int64

// TemplateBuilds is how many templates this process has built.
func TemplateBuilds() int64 { return builds.Load() }

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

// build boots a VM of cfg's shape to agent-ready, saves it into a new
// directory and publishes it under its key with one rename.
func (ts *Templates) build(ctx context.Context, cfg *Config, accel Accel, meta TemplateMeta) (err error) {
	began := time.Now()
	tmp, err := os.MkdirTemp(ts.Dir, templateBuildPrefix)
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
		Cgroup:   buildCgroup(cfg.Cgroup),
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
	// Only the published files stay (the share, the console log and the
	// root QEMU chrooted into go).
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
	if err := syncFile(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return syncFile(filepath.Dir(dir))
}

// syncFile fsyncs a file or a directory.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

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

// buildCgroup names the cgroup of the VM that builds a template for a VM
// whose cgroup is name: confined alike, under a name of its own.
func buildCgroup(name string) string {
	if name == "" {
		return ""
	}
	return name + "-build"
}
