package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/health"
	"github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/share"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// maxSpecFile bounds the bundle's config.json.
const maxSpecFile = 1 << 20

// stopTimeout bounds a graceful VM stop before SIGKILL.
const stopTimeout = 10 * time.Second

// box is one microVM running one container.
type box struct {
	id, ns, bundle string
	// spec is the bundle's config.json as read; ociSpec is its decoded
	// form (hooks, annotations).
	spec    []byte
	ociSpec *specs.Spec
	// rootfs is the directory shared with the guest.
	rootfs string
	// mounted says the shim mounted rootfs from CreateTaskRequest.Rootfs.
	mounted bool
	// stateDir holds the VMM's sockets, console log and pid file, the
	// share and the network state.
	stateDir string
	// net is the box's network; nil until made.
	net *boxNetwork
	// share is the directory shared with the VM; nil until made.
	share *share.Share
	sb    *sandbox.Sandbox
	init  *process

	// healthOpts configures the health checker.
	healthOpts health.Options

	// mu guards execs, stopHealthFn.
	mu sync.Mutex
	// execs by exec id. Guarded by mu.
	execs map[string]*process
	// stopHealthFn ends the health checker; nil until one starts. Guarded
	// by mu.
	stopHealthFn context.CancelFunc
}

// readSpec reads and checks the bundle's OCI spec.
func readSpec(bundle string) ([]byte, *specs.Spec, error) {
	path := filepath.Join(bundle, "config.json")
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("bundle spec: %w", errdefs.ErrInvalidArgument)
	}
	defer f.Close()
	data := make([]byte, maxSpecFile+1)
	n, _ := io.ReadFull(f, data)
	if n > maxSpecFile {
		return nil, nil, fmt.Errorf("%s exceeds %d bytes: %w", path, maxSpecFile, errdefs.ErrInvalidArgument)
	}
	data = data[:n]
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, nil, fmt.Errorf("%s is not a valid OCI spec: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || len(spec.Process.Args) == 0 {
		return nil, nil, fmt.Errorf("%s has no process to run (process.args is empty): %w", path, errdefs.ErrInvalidArgument)
	}
	if spec.Root == nil || spec.Root.Path == "" {
		return nil, nil, fmt.Errorf("%s has no root.path: %w", path, errdefs.ErrInvalidArgument)
	}
	return data, &spec, nil
}

// withHostHostname returns data with hostname set to the host's when the
// spec sets none. runc leaves such a container with the hostname its new UTS
// namespace copied from the host; in the guest that would be the VM's, so the
// host's is set explicitly to behave the same.
func withHostHostname(data []byte, spec *specs.Spec) ([]byte, error) {
	if spec.Hostname != "" {
		return data, nil
	}
	host, err := os.Hostname()
	if err != nil {
		return data, nil
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	doc["hostname"], _ = json.Marshal(host)
	return json.Marshal(doc)
}

// prepareRootfs mounts containerd's rootfs mounts on <bundle>/rootfs, or
// checks the spec's root.path. It returns the directory to share.
func prepareRootfs(bundle string, spec *specs.Spec, mounts []*types.Mount) (string, bool, error) {
	if len(mounts) == 0 {
		root := spec.Root.Path
		if !filepath.IsAbs(root) {
			root = filepath.Join(bundle, root)
		}
		st, err := os.Stat(root)
		if err != nil {
			return "", false, fmt.Errorf("rootfs %s: %w", root, errdefs.ErrInvalidArgument)
		}
		if !st.IsDir() {
			return "", false, fmt.Errorf("rootfs %s is not a directory: %w", root, errdefs.ErrInvalidArgument)
		}
		return root, false, nil
	}
	target := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(target, 0o711); err != nil {
		return "", false, err
	}
	var ms []mount.Mount
	for _, m := range mounts {
		ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if err := mount.All(ms, target); err != nil {
		return "", false, fmt.Errorf("mount rootfs on %s: %w", target, err)
	}
	return target, true, nil
}

// bootBox makes the box's network and share and boots its VM with them;
// it returns where the container finds its rootfs and bind mounts in the
// share. ctx bounds the boot only. On failure, what was made is left for
// teardown.
func bootBox(ctx context.Context, b *box, runtimeOpts *anypb.Any) (*boxShare, error) {
	o, err := parseVMOptions(b.ociSpec, runtimeOpts)
	if err != nil {
		return nil, err
	}
	kernel, err := vmm.FindKernel(o.kernel)
	if err != nil {
		return nil, err
	}
	initrd, err := vmm.FindInitrd(o.initrd)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(b.stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("vm state directory: %w", err)
	}
	if b.share, err = share.Create(filepath.Join(b.stateDir, shareDirName)); err != nil {
		return nil, err
	}
	shared, err := shareContainer(b.share, b.id, b.rootfs, b.ociSpec)
	if err != nil {
		return nil, err
	}
	if b.net, err = newBoxNetwork(b.ociSpec, b.stateDir); err != nil {
		return nil, err
	}
	sb, err := sandbox.Start(ctx, sandbox.Config{
		VM: vmm.Config{
			Kernel: kernel, Initrd: initrd, Share: b.share.Dir(), StateDir: b.stateDir,
			VCPUs: o.vcpus, MemoryMiB: o.memoryMiB, Accel: o.accel,
			NICs: b.net.nics(), NetNS: b.net.ns,
		},
		BootTimeout: o.bootTimeout,
	})
	// QEMU holds the taps now (or never will): each lives as long as it.
	b.net.closeTaps()
	if err != nil {
		return nil, err
	}
	b.sb = sb
	b.healthOpts = o.health
	return shared, nil
}

// vmmPid is the VMM's pid: the "pid" of every task in the box, as Kata does.
func (b *box) vmmPid() uint32 {
	if b.sb == nil {
		return 0
	}
	return uint32(b.sb.VM().Identity().Pid)
}

// process returns the init (execID "") or an exec.
func (b *box) process(execID string) (*process, error) {
	if execID == "" {
		return b.init, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s in %s: %w", execID, b.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// processes returns the init and every exec.
func (b *box) processes() []*process {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ps []*process
	if b.init != nil {
		ps = append(ps, b.init)
	}
	for _, p := range b.execs {
		ps = append(ps, p)
	}
	return ps
}

// teardown stops the VM (graceful, then SIGKILL at the deadline) and, only
// once the VMM is reaped, undoes the network wiring, unmounts the share and
// the rootfs and removes the state directory. An error names the live pid
// and leaves the files in place; the state directory is never removed while
// the share may still hold bind mounts of the host's files.
func (b *box) teardown(ctx context.Context) error {
	b.stopHealth()
	if b.sb != nil {
		// No DeleteContainer in the guest first: the guest's shutdown kills
		// every container's cgroup, reaps and unmounts, and the VM goes
		// with it, so a crun delete there (about 170 ms under TCG) would
		// only delay the stop.
		sctx, cancel := context.WithTimeout(ctx, stopTimeout)
		err := b.sb.Stop(sctx)
		cancel()
		if err != nil {
			return fmt.Errorf("stop vm of %s: %w", b.id, err)
		}
	}
	var errs []error
	for _, p := range b.processes() {
		if r := p.getRelay(); r != nil {
			r.close()
		}
	}
	if err := b.net.teardown(); err != nil {
		errs = append(errs, fmt.Errorf("network of %s: %w", b.id, err))
	}
	b.net = nil
	// The share binds the rootfs: it goes first.
	shareErr := share.Remove(filepath.Join(b.stateDir, shareDirName))
	if shareErr != nil {
		errs = append(errs, shareErr)
	}
	if b.mounted {
		if err := mount.UnmountRecursive(b.rootfs, 0); err != nil {
			errs = append(errs, fmt.Errorf("unmount rootfs %s: %w", b.rootfs, err))
		}
	}
	if shareErr == nil {
		if err := os.RemoveAll(b.stateDir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
