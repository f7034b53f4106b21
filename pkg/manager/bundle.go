package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// cfsPeriod is the CPU bandwidth period --cpus is expressed against.
const cfsPeriod = 100000

// BoxSpec is what the user asked the box's process to be.
type BoxSpec struct {
	// Args is the command and its arguments. Required.
	Args []string
	// Env holds K=V pairs added to containerd's default environment.
	Env []string
	// Cwd is the working directory in the box (default /).
	Cwd string
	// User is UID[:GID] or a user name from the rootfs's /etc/passwd.
	User string
	// MemoryBytes limits the process's memory (0: no limit).
	MemoryBytes uint64
	// CPUs is the number of CPUs (0: default); it sizes the VM and sets a
	// CFS quota of CPUs × period.
	CPUs float64
	// Terminal gives the process a pseudo-terminal.
	Terminal bool
	// Rootfs is the root filesystem directory. Required.
	Rootfs string
	// Annotations are added to the spec (the io.boxlite.* settings the shim
	// reads, such as the health check's).
	Annotations map[string]string
}

// checkRootfs returns the absolute path of a root filesystem directory, or
// a one-line error saying what is wrong with it.
func checkRootfs(rootfs string) (string, error) {
	if rootfs == "" {
		return "", errorf(errdefs.ErrInvalidArgument, "--rootfs DIR is required")
	}
	abs, err := filepath.Abs(rootfs)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(abs)
	if errors.Is(err, os.ErrNotExist) {
		return "", errorf(errdefs.ErrInvalidArgument, "rootfs %s does not exist", rootfs)
	}
	if err != nil {
		return "", fmt.Errorf("rootfs %s: %w", rootfs, unwrapPath(err))
	}
	if !st.IsDir() {
		return "", errorf(errdefs.ErrInvalidArgument, "rootfs %s is not a directory", rootfs)
	}
	return abs, nil
}

// GenerateSpec returns containerd's default Linux spec for box id with s
// applied, the spec ctr would send: root.path is the absolute rootfs (the
// shim shares it with the VM).
func GenerateSpec(id string, s BoxSpec) (*specs.Spec, error) {
	if len(s.Args) == 0 {
		return nil, errorf(errdefs.ErrInvalidArgument, "no command given")
	}
	opts := []oci.SpecOpts{
		// root.path first: WithUser reads the rootfs's /etc/passwd.
		oci.WithRootFSPath(s.Rootfs),
		oci.WithProcessArgs(s.Args...),
		// No image config: PATH is containerd's default, as ctr --rootfs.
		oci.WithDefaultPathEnv,
		oci.WithEnv(s.Env),
		// As docker and nerdctl do (ctr does not): the box sees its own
		// cgroup, read-only, at /sys/fs/cgroup.
		oci.WithMounts([]specs.Mount{{
			Destination: "/sys/fs/cgroup",
			Type:        "cgroup",
			Source:      "cgroup",
			Options:     []string{"ro", "nosuid", "noexec", "nodev"},
		}}),
	}
	if s.Cwd != "" {
		opts = append(opts, oci.WithProcessCwd(s.Cwd))
	}
	if s.User != "" {
		opts = append(opts, oci.WithUser(s.User))
	}
	// The shim sizes the VM to fit these limits.
	if s.MemoryBytes > 0 {
		opts = append(opts, oci.WithMemoryLimit(s.MemoryBytes))
	}
	if s.CPUs < 0 {
		return nil, errorf(errdefs.ErrInvalidArgument, "--cpus %v: must be positive", s.CPUs)
	}
	if s.CPUs > 0 {
		opts = append(opts, oci.WithCPUCFS(int64(math.Ceil(s.CPUs*cfsPeriod)), cfsPeriod))
	}
	if s.Terminal {
		opts = append(opts, oci.WithTTY)
	}
	if len(s.Annotations) > 0 {
		opts = append(opts, oci.WithAnnotations(s.Annotations))
	}
	ctx := namespaces.WithNamespace(context.Background(), Namespace)
	spec, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: id}, opts...)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	return spec, nil
}

// writeBundle creates the bundle directory with config.json. (containerd
// also makes a "log" FIFO it reads; the manager, which exits while shims run,
// makes none, and the shim logs to shim.log in the bundle instead.)
func writeBundle(dir string, spec *specs.Spec) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	data, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	return nil
}

// readSpec reads a bundle's config.json.
func readSpec(dir string) (*specs.Spec, error) {
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	var s specs.Spec
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	return &s, nil
}

// ExecSpec is what the user asked an exec'd process to be.
type ExecSpec struct {
	// Args is the command and its arguments. Required.
	Args []string
	// Env holds K=V pairs added to the box's environment.
	Env []string
	// Cwd overrides the box's working directory.
	Cwd string
	// User overrides the box's user (UID[:GID] or a name).
	User string
	// Terminal gives the process a pseudo-terminal.
	Terminal bool
}

// execProcess derives an exec'd process from the box's spec, the way ctr
// task exec does: the box's process with args, terminal, cwd and user
// replaced and env added.
func execProcess(box *specs.Spec, e ExecSpec) (*specs.Process, error) {
	if len(e.Args) == 0 {
		return nil, errorf(errdefs.ErrInvalidArgument, "no command given")
	}
	spec := *box
	p := *box.Process
	spec.Process = &p
	p.Args = e.Args
	p.Terminal = e.Terminal
	p.Env = append([]string(nil), p.Env...)
	opts := []oci.SpecOpts{oci.WithEnv(e.Env)}
	if e.Cwd != "" {
		opts = append(opts, oci.WithProcessCwd(e.Cwd))
	}
	if e.User != "" {
		opts = append(opts, oci.WithUser(e.User))
	}
	ctx := namespaces.WithNamespace(context.Background(), Namespace)
	if err := oci.ApplyOpts(ctx, nil, &containers.Container{}, &spec, opts...); err != nil {
		return nil, fmt.Errorf("exec spec: %w", err)
	}
	return spec.Process, nil
}
