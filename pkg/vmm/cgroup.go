package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// The limits of the VMM's own cgroup (Config.Cgroup). They contain a
// runaway QEMU, not a guest: the guest cannot use more RAM than it was
// given, so memory beyond it is QEMU's own.
const (
	// vmmOverheadMiB is QEMU's memory beyond guest RAM with a generous
	// margin: its heap, device state, 9p buffers and the page cache its
	// reads charge here (reclaimable, so it never causes an OOM on its
	// own). Measured peak, guest RAM filled and 9p busy: in docs/design.md,
	// "A confined VMM".
	vmmOverheadMiB = 160
	// tcgCodeCacheMiB bounds TCG's translation cache (-accel
	// tcg,tb-size=). QEMU 7.2 reserves 1 GiB by default and fills it as
	// the guest runs new code, which a memory limit would have to allow;
	// a busy box's working set measured well under this (design.md). When
	// it fills, QEMU flushes it and translates again.
	tcgCodeCacheMiB = 256
	// vmmPidsBase bounds QEMU's threads besides one per vCPU: main, RCU,
	// the migration thread of a clone, and a thread pool for 9p and block
	// I/O of at most 64 workers (7 threads measured on a busy box).
	// -sandbox spawn=deny already forbids fork and exec.
	vmmPidsBase = 96
	// CgroupFileName, in the state dir, lists the VMM cgroup's
	// directories, so that whoever cleans up after a dead shim (KillStale)
	// can remove them.
	CgroupFileName = "vmm.cgroup"
	// cgroupV2Fallback is where a VMM's cgroup goes on cgroup v2 when the
	// shim's own cgroup cannot have controlled children because it holds
	// processes (v2's "no internal processes" rule), as Kata's
	// kata_overhead does.
	cgroupV2Fallback = "/boxlite"
)

// vmmPidsLimit is the pids limit of the cgroup of a VM with vcpus.
func vmmPidsLimit(vcpus int) int64 { return int64(vmmPidsBase + vcpus) }

// vmmMemoryLimit is the memory limit of the cgroup of a VM with memMiB of
// RAM under accel.
func vmmMemoryLimit(memMiB int, accel Accel) int64 {
	mib := int64(memMiB) + vmmOverheadMiB
	if accel == AccelTCG {
		mib += tcgCodeCacheMiB
	}
	return mib << 20
}

// vmmCgroup is the cgroup of one VMM: on a v1 (or hybrid) host, a group in
// the memory and pids hierarchies under the shim's own; on a v2 host, a
// group under the shim's, or under /boxlite when the shim's holds
// processes.
type vmmCgroup struct {
	// dirs are its directories, one per v1 hierarchy or the v2 one.
	dirs []string
	// eventsPath is memory.oom_control (v1) or memory.events (v2).
	eventsPath string
	// v1 is the v1 group; v2 the v2 one. Exactly one is set.
	v1 cgroup1.Cgroup
	v2 *cgroup2.Manager
}

// errNoCgroupControllers says the host has no memory or pids controller
// this process can use: the VMM runs unconfined.
var errNoCgroupControllers = errors.New("no usable memory and pids cgroup controllers")

// newVMMCgroup creates the cgroup name for a VMM with its limits. It
// returns errNoCgroupControllers (wrapped) when the host has none to
// create it with.
func newVMMCgroup(name string, memLimit, pids int64) (*vmmCgroup, error) {
	if cgroups.Mode() == cgroups.Unified {
		return newVMMCgroupV2(name, memLimit, pids)
	}
	return newVMMCgroupV1(name, memLimit, pids)
}

func newVMMCgroupV1(name string, memLimit, pids int64) (*vmmCgroup, error) {
	root := cgroupRoot
	hier := func() ([]cgroup1.Subsystem, error) {
		return []cgroup1.Subsystem{cgroup1.NewMemory(root), cgroup1.NewPids(root)}, nil
	}
	self, err := cgroup1.ParseCgroupFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, ctrl := range []string{"memory", "pids"} {
		p, ok := self[ctrl]
		if !ok {
			return nil, fmt.Errorf("%w: no v1 %s controller in /proc/self/cgroup", errNoCgroupControllers, ctrl)
		}
		dirs = append(dirs, filepath.Join(root, ctrl, p, name))
	}
	path := func(n cgroup1.Name) (string, error) {
		p, ok := self[string(n)]
		if !ok {
			return "", cgroup1.ErrControllerNotActive
		}
		return filepath.Join(p, name), nil
	}
	res := &specs.LinuxResources{
		Memory: &specs.LinuxMemory{Limit: &memLimit},
		Pids:   &specs.LinuxPids{Limit: &pids},
	}
	cg, err := cgroup1.New(path, res, cgroup1.WithHierarchy(hier))
	if err != nil {
		// A half-made group (memory made, pids failed) is removed.
		for _, d := range dirs {
			os.Remove(d)
		}
		return nil, fmt.Errorf("create vmm cgroup %s: %w", name, err)
	}
	return &vmmCgroup{dirs: dirs, eventsPath: filepath.Join(dirs[0], "memory.oom_control"), v1: cg}, nil
}

func newVMMCgroupV2(name string, memLimit, pids int64) (*vmmCgroup, error) {
	self, err := cgroup2.NestedGroupPath("")
	if err != nil {
		return nil, err
	}
	res := &cgroup2.Resources{
		Memory: &cgroup2.Memory{Max: &memLimit},
		Pids:   &cgroup2.Pids{Max: pids},
	}
	group := filepath.Join(self, name)
	m, err := cgroup2.NewManager(cgroupRoot, group, res)
	if errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.EOPNOTSUPP) {
		// The shim's group holds processes (containerd's, when the shim
		// was not given a cgroup of its own): v2 lets no controlled
		// child live beside them.
		group = filepath.Join(cgroupV2Fallback, name)
		m, err = cgroup2.NewManager(cgroupRoot, group, res)
	}
	if err != nil {
		return nil, fmt.Errorf("create vmm cgroup %s: %w", group, err)
	}
	dir := filepath.Join(cgroupRoot, group)
	return &vmmCgroup{dirs: []string{dir}, eventsPath: filepath.Join(dir, "memory.events"), v2: m}, nil
}

// openDir opens the v2 group for clone3's CLONE_INTO_CGROUP, so that the
// VMM is born in it; nil on v1, where add moves it after it started.
func (c *vmmCgroup) openDir() (*os.File, error) {
	if c.v2 == nil {
		return nil, nil
	}
	return os.Open(c.dirs[0])
}

// add moves pid into the group: on v1, right after the VMM started (the
// few pages it touched before stay charged to the shim's group).
func (c *vmmCgroup) add(pid int) error {
	if c.v1 != nil {
		return c.v1.AddProc(uint64(pid))
	}
	return c.v2.AddProc(uint64(pid))
}

// record writes the group's directories to path, for KillStale.
func (c *vmmCgroup) record(path string) error {
	return os.WriteFile(path, []byte(strings.Join(c.dirs, "\n")+"\n"), 0o600)
}

// remove removes the group, which must be empty: the VMM was reaped. The
// kernel may take a moment to let go of a group whose last task just
// exited, so EBUSY is retried briefly.
func (c *vmmCgroup) remove() error {
	return removeCgroupDirs(c.dirs)
}

// removeCgroupDirs removes cgroup directories (not their files: a cgroup's
// are the kernel's), tolerating ones already gone.
func removeCgroupDirs(dirs []string) error {
	var errs []error
	deadline := time.Now().Add(2 * time.Second)
	for _, d := range dirs {
		var err error
		for ; ; time.Sleep(10 * time.Millisecond) {
			err = syscall.Rmdir(d)
			if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
				break
			}
		}
		if err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("remove vmm cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// removeRecordedCgroup removes the groups listed in stateDir's
// CgroupFileName, then the file: the cleanup of a VMM whose shim died.
func removeRecordedCgroup(stateDir string) {
	path := filepath.Join(stateDir, CgroupFileName)
	data, err := os.ReadFile(path)
	if err != nil {
		return
	}
	var dirs []string
	for _, d := range strings.Split(string(data), "\n") {
		// Only cgroup directories are ever listed: a damaged file must not
		// make us remove anything else.
		if d = strings.TrimSpace(d); d != "" && strings.HasPrefix(filepath.Clean(d), cgroupRoot+"/") {
			dirs = append(dirs, filepath.Clean(d))
		}
	}
	if err := removeCgroupDirs(dirs); err != nil {
		log.L.WithError(err).Warn("remove a dead vmm's cgroup")
		return
	}
	os.Remove(path)
}

// CheckCgroup makes and removes the cgroup a VMM would get, and describes
// it, for `boxlite check`. An error says the VMM would run unconfined
// (errNoCgroupControllers) or could not start.
func CheckCgroup() (string, error) {
	cg, err := newVMMCgroup(fmt.Sprintf("boxlite-check-%d", os.Getpid()), vmmMemoryLimit(DefaultMemoryMiB, AccelTCG), vmmPidsLimit(DefaultVCPUs))
	if err != nil {
		return "", err
	}
	defer cg.remove()
	where := "cgroup v1 memory and pids hierarchies"
	if cg.v2 != nil {
		where = "cgroup v2"
	}
	return fmt.Sprintf("its own cgroup (%s, under the shim's; from here: %s): memory = the VM's RAM + %d MiB (+ %d MiB for TCG's code cache), at most %d threads + one per vCPU",
		where, filepath.Dir(cg.dirs[0]), vmmOverheadMiB, tcgCodeCacheMiB, vmmPidsBase), nil
}
