package shim

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"sync"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/health"
	guestvm "github.com/boxlite/boxlite/pkg/sandbox"
	"github.com/boxlite/boxlite/pkg/share"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// guestVM is what the shim needs from a booted VM and its agent: a
// *guestvm.Sandbox, or a fake in tests. The shim never reaches past it to
// the VMM.
type guestVM interface {
	// Agent is the guest agent's client.
	Agent() *agent.Client
	// Pid is the VMM's pid: every task's pid.
	Pid() uint32
	// OOMKilled says, once Done is closed, that the host's OOM killer
	// took the VMM.
	OOMKilled() bool
	// Done is closed once the VMM has exited and been reaped.
	Done() <-chan struct{}
	// ConsoleTail returns up to the last n lines of the guest's console.
	ConsoleTail(n int) []string
	// Stop shuts the guest down, then the VMM; it returns once the VMM is
	// reaped, and can be retried when it failed.
	Stop(ctx context.Context) error
	// Kill is the canonical kill path: SIGKILL, then the reaper's wait.
	Kill() error
	// GuestMACs are the NICs' addresses as the guest finds them, in NIC
	// order (a VM restored from a template has the template's).
	GuestMACs() []net.HardwareAddr
}

var _ guestVM = (*guestvm.Sandbox)(nil)

// sandbox is the one VM of a shim with everything that lives as long as it:
// the state directory, the network wiring, the share, the health checker
// and the exit loop. A single-container box is its own sandbox; a pod's
// sandbox is booted by its pause container and runs its app containers too.
type sandbox struct {
	// id is the box's id, or the pod's sandbox id.
	id, ns string
	// bundle is the sandbox container's bundle: the health file and the
	// network info go there.
	bundle string
	// stateDir holds the VMM's sockets, console log and pid file, the
	// share and the network state.
	stateDir string
	// net is the sandbox's network; nil until made and after teardown.
	net *boxNetwork
	// share is the directory shared with the VM; nil until made.
	share *share.Share
	// vm is the running VM; nil until booted.
	vm guestVM
	// exits is the sandbox's one exit loop; nil until the VM runs.
	exits *exitLoop
	// healthOpts configures the health checker.
	healthOpts health.Options
	// memoryMiB is the VM's memory, fixed at boot.
	memoryMiB int

	// mu guards stopHealthFn and tornDown.
	mu sync.Mutex
	// stopHealthFn ends the health checker; nil until one starts. Guarded
	// by mu.
	stopHealthFn context.CancelFunc
	// tornDown says teardown completed: the VM and everything of the
	// sandbox on the host are gone. Guarded by mu.
	tornDown bool
}

// newSandbox returns the sandbox that c (a box or a pod's pause container)
// boots.
func newSandbox(c *container) *sandbox {
	return &sandbox{id: c.id, ns: c.ns, bundle: c.bundle, stateDir: boxStateDir(c.ns, c.id)}
}

// boot makes the sandbox's network and share and boots its VM, sized by
// the first container's spec and the runtime options. ctx bounds the boot
// only. On failure, what was made is left for teardown.
func (sb *sandbox) boot(ctx context.Context, first *container, runtimeOpts *anypb.Any) error {
	o, err := parseVMOptions(first.ociSpec, runtimeOpts)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(sb.stateDir, 0o700); err != nil {
		return fmt.Errorf("vm state directory: %w", err)
	}
	if sb.share, err = share.Create(filepath.Join(sb.stateDir, shareDirName)); err != nil {
		return err
	}
	if sb.net, err = newBoxNetwork(first.ociSpec, sb.stateDir); err != nil {
		return err
	}
	cfg := guestvm.Config{
		VM: vmm.Config{
			Kernel: o.kernel, Initrd: o.initrd, Share: sb.share.Dir(), StateDir: sb.stateDir,
			VCPUs: o.vcpus, MemoryMiB: o.memoryMiB, Accel: o.accel,
			NICs: sb.net.nics(), NetNS: sb.net.ns,
			Cgroup: vmmCgroupName(sb.stateDir),
		},
		BootTimeout: o.bootTimeout,
	}
	if o.templates {
		cfg.VM.Templates = &vmm.Templates{Dir: templateDir()}
	}
	vm, err := guestvm.Start(ctx, cfg)
	// QEMU holds the taps now (or never will): each lives as long as it.
	sb.net.closeTaps()
	if err != nil {
		return err
	}
	sb.vm = vm
	sb.healthOpts = o.health
	sb.memoryMiB = cmp.Or(o.memoryMiB, vmm.DefaultMemoryMiB)
	return nil
}

// vmmCgroupName names the VMM's own cgroup after the box's state dir,
// which is unique per namespace and id: shims that share containerd's
// cgroup make theirs side by side.
func vmmCgroupName(stateDir string) string {
	return "boxlite-vmm-" + filepath.Base(stateDir)
}

// pid is the VMM's pid: the "pid" of every task in the sandbox, as Kata
// does; 0 before boot.
func (sb *sandbox) pid() uint32 {
	if sb.vm == nil {
		return 0
	}
	return sb.vm.Pid()
}

// alive says the VM runs.
func (sb *sandbox) alive() bool {
	if sb.vm == nil {
		return false
	}
	select {
	case <-sb.vm.Done():
		return false
	default:
		return true
	}
}

// shareDir is where container id's files are in the share.
func shareDir(id string) string { return path.Join("c", id) }

// addContainer binds c's rootfs and bind mount sources into the share,
// where the running VM finds them at once (9p follows new bind mounts).
func (sb *sandbox) addContainer(c *container) (*boxShare, error) {
	c.shared = true
	_, _, shm := c.podRequest()
	return shareContainer(sb.share, shareDir(c.id), c.rootfs, c.ociSpec, shm)
}

// removeContainer takes c's files out of the share of a running sandbox.
func (sb *sandbox) removeContainer(c *container) error {
	if !c.shared || sb.share == nil || sb.isTornDown() {
		return nil
	}
	if err := sb.share.Unbind(shareDir(c.id)); err != nil {
		return err
	}
	c.shared = false
	return nil
}

func (sb *sandbox) isTornDown() bool {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.tornDown
}

// teardown stops the VM (the guest's shutdown first, SIGKILL at the
// deadline), waits for the exit loop to publish every exit, and only once
// the VMM is reaped undoes the network wiring, unmounts the share and
// removes the state directory. An error names what is left (the live pid
// or a mount) and teardown can be called again; it does nothing once it
// succeeded. The state directory is never removed while the share may
// still hold bind mounts of the host's files.
func (sb *sandbox) teardown(ctx context.Context) error {
	sb.mu.Lock()
	done := sb.tornDown
	sb.mu.Unlock()
	if done {
		return nil
	}
	sb.stopHealth()
	if sb.vm != nil {
		// No DeleteContainer in the guest first: the guest's shutdown
		// kills every container's cgroup, reaps and unmounts, and the VM
		// goes with it, so a crun delete there (about 170 ms under TCG)
		// would only delay the stop.
		sctx, cancel := context.WithTimeout(ctx, stopTimeout)
		err := sb.vm.Stop(sctx)
		cancel()
		if err != nil {
			return fmt.Errorf("stop vm of %s: %w", sb.id, err)
		}
	}
	if sb.exits != nil {
		sb.exits.wait()
	}
	var errs []error
	if err := sb.net.teardown(); err != nil {
		errs = append(errs, fmt.Errorf("network of %s: %w", sb.id, err))
	}
	sb.net = nil
	// The share binds the rootfs: it goes first.
	if err := share.Remove(filepath.Join(sb.stateDir, shareDirName)); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := os.RemoveAll(sb.stateDir); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	sb.mu.Lock()
	sb.tornDown = true
	sb.mu.Unlock()
	return nil
}

// kill SIGKILLs the VM (Shutdown with Now): the canonical kill path.
func (sb *sandbox) kill() error {
	if sb.vm == nil {
		return nil
	}
	if err := sb.vm.Kill(); err != nil {
		return fmt.Errorf("kill vm of %s: %w", sb.id, err)
	}
	return nil
}
