package shim

import (
	"encoding/json"
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
)

// maxSpecFile bounds the bundle's config.json.
const maxSpecFile = 1 << 20

// stopTimeout bounds a graceful VM stop before SIGKILL.
const stopTimeout = 10 * time.Second

// CRI's annotations that make a container part of a pod.
const (
	// annotationContainerType is "sandbox" for a pod's pause container and
	// "container" for its app containers.
	annotationContainerType = "io.kubernetes.cri.container-type"
	// annotationSandboxID names the pod's sandbox (its pause container).
	annotationSandboxID = "io.kubernetes.cri.sandbox-id"

	containerTypeSandbox   = "sandbox"
	containerTypeContainer = "container"
)

// role is what a container is to the sandbox that runs it.
type role int

const (
	// roleBox is a single-container box: the container is its sandbox.
	roleBox role = iota
	// rolePodSandbox is a pod's sandbox (pause) container: it boots the
	// pod's VM and holds the pod's namespaces in the guest.
	rolePodSandbox
	// rolePodMember is an app container of a pod, run in the pod's VM.
	rolePodMember
)

// roleOf reads a container's role and its sandbox's id (its own for a box
// or a pod sandbox) from CRI's annotations.
func roleOf(id string, spec *specs.Spec) (role, string, error) {
	typ := spec.Annotations[annotationContainerType]
	sbID := spec.Annotations[annotationSandboxID]
	switch typ {
	case "":
		return roleBox, id, nil
	case containerTypeSandbox:
		if sbID != "" && sbID != id {
			return 0, "", fmt.Errorf("pod sandbox %s names another sandbox (%s=%s): %w", id, annotationSandboxID, sbID, errdefs.ErrInvalidArgument)
		}
		return rolePodSandbox, id, nil
	case containerTypeContainer:
		if sbID == "" {
			return 0, "", fmt.Errorf("container %s of a pod names no sandbox (%s is empty): %w", id, annotationSandboxID, errdefs.ErrInvalidArgument)
		}
		if sbID == id {
			return 0, "", fmt.Errorf("container %s names itself as its sandbox: %w", id, errdefs.ErrInvalidArgument)
		}
		return rolePodMember, sbID, nil
	}
	return 0, "", fmt.Errorf("%s=%q: want %q or %q: %w", annotationContainerType, typ, containerTypeSandbox, containerTypeContainer, errdefs.ErrInvalidArgument)
}

// container is one OCI container of the shim's sandbox: its bundle, rootfs,
// init and execs. The VM, network and share belong to the sandbox.
type container struct {
	id, ns, bundle string
	// role says whether the container is its sandbox or joins one.
	role role
	// sandboxID is the id of the sandbox the container runs in (its own
	// for a box or a pod's sandbox container).
	sandboxID string
	// spec is the bundle's config.json as read; ociSpec is its decoded
	// form (hooks, annotations).
	spec    []byte
	ociSpec *specs.Spec
	// opts are the container's settings from runc's options type.
	opts taskOptions
	// rootfs is the directory shared with the guest.
	rootfs string
	// mounted says the shim mounted rootfs from CreateTaskRequest.Rootfs.
	mounted bool
	// shared says the container's files were bound into the sandbox's
	// share (under c/<id>).
	shared bool
	init   *process

	// mu guards execs.
	mu sync.Mutex
	// execs by exec id. Guarded by mu.
	execs map[string]*process
}

// inPod says the container is part of a Kubernetes pod.
func (c *container) inPod() bool { return c.role != roleBox }

// podRequest returns what the guest needs to place c in its pod: the pod's
// sandbox container (for an app container), the namespace types c shares
// with it (those its spec names by path), and the indexes of its /dev/shm
// bind mounts, which the guest serves from one tmpfs per pod.
func (c *container) podRequest() (sandboxID string, joins []string, shm []uint32) {
	if !c.inPod() {
		return "", nil, nil
	}
	if c.role == rolePodMember {
		sandboxID = c.sandboxID
		if c.ociSpec.Linux != nil {
			for _, ns := range c.ociSpec.Linux.Namespaces {
				switch ns.Type {
				case specs.NetworkNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.PIDNamespace:
					if ns.Path != "" {
						joins = append(joins, string(ns.Type))
					}
				}
			}
		}
	}
	for i, m := range c.ociSpec.Mounts {
		if m.Destination == "/dev/shm" && isBindMount(m) {
			shm = append(shm, uint32(i))
		}
	}
	return sandboxID, joins, shm
}

// isSandbox says the container is its sandbox's own (a box, or a pod's
// pause container): its end is the VM's end.
func (c *container) isSandbox() bool { return c.role != rolePodMember }

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
// spec sets none and gives the container a new UTS namespace. runc leaves
// such a container with the hostname its new UTS namespace copied from the
// host; in the guest that would be the VM's, so the host's is set
// explicitly to behave the same. A container that joins a UTS namespace (a
// pod's app container) keeps its pod's hostname.
func withHostHostname(data []byte, spec *specs.Spec) ([]byte, error) {
	if spec.Hostname != "" || !newUTSNamespace(spec) {
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

// newUTSNamespace says the spec gives the container a UTS namespace of its
// own.
func newUTSNamespace(spec *specs.Spec) bool {
	if spec.Linux == nil {
		return false
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.UTSNamespace {
			return ns.Path == ""
		}
	}
	return false
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

// process returns the init (execID "") or an exec.
func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s in %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// processes returns the init and every exec.
func (c *container) processes() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ps []*process
	if c.init != nil {
		ps = append(ps, c.init)
	}
	for _, p := range c.execs {
		ps = append(ps, p)
	}
	return ps
}

// unmountRootfs undoes what prepareRootfs mounted. Call it once nothing
// (the share, the VM) uses the rootfs any more.
func (c *container) unmountRootfs() error {
	if !c.mounted {
		return nil
	}
	if err := mount.UnmountRecursive(c.rootfs, 0); err != nil {
		return fmt.Errorf("unmount rootfs %s: %w", c.rootfs, err)
	}
	c.mounted = false
	return nil
}

// closeRelays closes the stdio of every process (loggers flushed).
func (c *container) closeRelays() {
	for _, p := range c.processes() {
		if r := p.getRelay(); r != nil {
			r.close()
		}
	}
}
