package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// podShmOptions size a pod's /dev/shm as CRI sizes it on a host.
const podShmOptions = "mode=1777,size=67108864"

// nsFiles maps the namespace types a pod's containers may share to their
// file in /proc/<pid>/ns.
var nsFiles = map[string]string{
	"network": "net",
	"ipc":     "ipc",
	"uts":     "uts",
	"pid":     "pid",
}

// podShmDir is where the pod of sandbox container id keeps its /dev/shm.
func (a *Agent) podShmDir(id string) string { return filepath.Join(a.cfg.stateDir, "pods", id, "shm") }

// podSetup is what a container takes from its pod: the guest namespaces it
// joins (type → /proc path) and the source of its /dev/shm bind mounts.
type podSetup struct {
	joins map[string]string
	// sharedPID says the container joins its pod's pid namespace: when its
	// init exits, nothing else of it dies with the namespace.
	sharedPID bool
	// shm is the pod's /dev/shm directory, when the spec mounts it.
	shm string
	// shmMounts are the spec's mount indexes served from shm.
	shmMounts []int
}

// podFor works out what container c takes from its pod. A pod's sandbox
// container (no sandbox_id) makes the pod's /dev/shm when its spec mounts
// it; an app container joins the sandbox container's namespaces, which
// must be alive.
func (a *Agent) podFor(c *container, req *api.CreateContainerRequest, undo *cleanups) (*podSetup, error) {
	ps := &podSetup{}
	sbID := req.GetSandboxId()
	joins := req.GetJoinNamespaces()
	if sbID == "" {
		if len(joins) > 0 {
			return nil, fmt.Errorf("container %s joins namespaces %v of no sandbox: %w", c.id, joins, errdefs.ErrInvalidArgument)
		}
	} else if err := validateID("sandbox id", sbID); err != nil {
		return nil, err
	}
	for _, i := range req.GetPodShmMounts() {
		ps.shmMounts = append(ps.shmMounts, int(i))
	}
	if sbID == "" {
		if len(ps.shmMounts) > 0 {
			if err := a.makePodShm(c, undo); err != nil {
				return nil, err
			}
			ps.shm = c.podShm
		}
		return ps, nil
	}
	sb, err := a.container(sbID)
	if err != nil {
		return nil, fmt.Errorf("sandbox container of %s: %w", c.id, err)
	}
	pid := 0
	if sb.init != nil && !sb.init.hasExited() {
		pid = sb.init.pid
	}
	if pid == 0 {
		return nil, fmt.Errorf("sandbox container %s of %s has exited: its namespaces are gone: %w", sbID, c.id, errdefs.ErrFailedPrecondition)
	}
	ps.joins = map[string]string{}
	for _, typ := range joins {
		f, ok := nsFiles[typ]
		if !ok {
			return nil, fmt.Errorf("namespace type %q cannot be shared in a pod (want one of network, ipc, uts, pid): %w", typ, errdefs.ErrInvalidArgument)
		}
		ps.joins[typ] = fmt.Sprintf("/proc/%d/ns/%s", pid, f)
	}
	ps.sharedPID = slices.Contains(joins, "pid")
	if len(ps.shmMounts) > 0 {
		if sb.podShm == "" {
			return nil, fmt.Errorf("sandbox container %s has no /dev/shm for %s: %w", sbID, c.id, errdefs.ErrFailedPrecondition)
		}
		ps.shm = sb.podShm
	}
	return ps, nil
}

// makePodShm mounts the pod's /dev/shm tmpfs for sandbox container c.
func (a *Agent) makePodShm(c *container, undo *cleanups) error {
	dir := a.podShmDir(c.id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("pod shm: %w", err)
	}
	if err := unix.Mount("shm", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, podShmOptions); err != nil {
		os.Remove(dir)
		return fmt.Errorf("mount pod shm on %s: %w", dir, err)
	}
	c.podShm = dir
	undo.add(func() { removePodShm(c) })
	return nil
}

// removePodShm unmounts and removes a sandbox container's pod /dev/shm.
func removePodShm(c *container) {
	if c.podShm == "" {
		return
	}
	unmount(c.podShm)
	if err := os.Remove(c.podShm); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.L.WithError(err).WithField("id", c.id).Warn("remove pod shm")
	}
	_ = os.Remove(filepath.Dir(c.podShm))
	c.podShm = ""
}

// killRest kills what is left of container c once its init exited in a
// pid namespace it shares with its pod (as runc's shim does): without its
// own namespace, nothing else of it dies with the init.
func (a *Agent) killRest(c *container) {
	path := filepath.Join(a.cfg.cgroupRoot, c.cgroup, "cgroup.kill")
	if err := os.WriteFile(path, []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.L.WithError(err).WithField("id", c.id).Warn("kill the rest of the container")
	}
}
