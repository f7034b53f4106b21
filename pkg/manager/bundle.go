package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

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
	// Privileged gives the process every capability, no seccomp filter,
	// every device and writable /proc and /sys, in the guest.
	Privileged bool
	// Rootfs is the root filesystem directory. Required.
	Rootfs string
	// Annotations are added to the spec (the io.boxlite.* settings the shim
	// reads, such as the health check's).
	Annotations map[string]string
	// Network is the box's network: NetworkUser (the default), NetworkNone
	// or "netns:PATH".
	Network string
	// Ports are published ports with user networking, each
	// [IP:]HOSTPORT:BOXPORT[/tcp|udp].
	Ports []string
	// Volumes are host paths bind-mounted into the box.
	Volumes []Volume
}

// Networks a box can have.
const (
	// NetworkUser is QEMU's user networking: outbound NAT and published
	// ports, with no network set-up on the host.
	NetworkUser = "user"
	// NetworkNone is loopback only.
	NetworkNone = "none"
	// networkNetNSPrefix starts "netns:PATH": the VM joins the network
	// namespace at PATH.
	networkNetNSPrefix = "netns:"
)

// Annotations the shim reads for user networking (pkg/shim's
// AnnotationNetwork and AnnotationPorts).
const (
	annotationNetwork = "io.boxlite.network"
	annotationPorts   = "io.boxlite.network.ports"
)

// Volume is a host file or directory bind-mounted into a box.
type Volume struct {
	// Source is the host path (made absolute); Destination the box path.
	Source, Destination string
	// ReadOnly mounts it read-only.
	ReadOnly bool
}

// ParseVolume parses -v HOSTPATH:BOXPATH[:ro|:rw].
func ParseVolume(s string) (Volume, error) {
	parts := strings.Split(s, ":")
	var v Volume
	switch {
	case len(parts) == 3 && (parts[2] == "ro" || parts[2] == "rw"):
		v.ReadOnly = parts[2] == "ro"
	case len(parts) != 2:
		return v, errorf(errdefs.ErrInvalidArgument, "volume %q: want HOSTPATH:BOXPATH[:ro|rw]", s)
	}
	if parts[0] == "" || !strings.HasPrefix(parts[1], "/") {
		return v, errorf(errdefs.ErrInvalidArgument, "volume %q: want HOSTPATH:BOXPATH[:ro|rw] with an absolute BOXPATH", s)
	}
	src, err := filepath.Abs(parts[0])
	if err != nil {
		return v, err
	}
	if _, err := os.Stat(src); err != nil {
		return v, errorf(errdefs.ErrInvalidArgument, "volume %q: %s does not exist", s, src)
	}
	v.Source, v.Destination = src, filepath.Clean(parts[1])
	return v, nil
}

// networkOpts returns the spec options of a box's network, and the files
// it binds into the box (user networking gets a resolv.conf naming QEMU's
// DNS forwarder and an /etc/hosts, written into dir).
func networkOpts(s BoxSpec, dir string) ([]oci.SpecOpts, error) {
	switch {
	case s.Network == "" || s.Network == NetworkUser:
		ann := map[string]string{annotationNetwork: NetworkUser}
		if len(s.Ports) > 0 {
			ann[annotationPorts] = strings.Join(s.Ports, ",")
		}
		mounts, err := userNetworkFiles(dir)
		if err != nil {
			return nil, err
		}
		return []oci.SpecOpts{oci.WithAnnotations(ann), oci.WithMounts(mounts)}, nil
	case len(s.Ports) > 0:
		return nil, errorf(errdefs.ErrInvalidArgument, "published ports need --network user")
	case s.Network == NetworkNone:
		// No NIC at all: the VM boots without one and the box has only
		// loopback (the spec's network namespace without a path stays).
		return []oci.SpecOpts{oci.WithAnnotations(map[string]string{annotationNetwork: NetworkNone})}, nil
	case strings.HasPrefix(s.Network, networkNetNSPrefix) && len(s.Network) > len(networkNetNSPrefix):
		path := strings.TrimPrefix(s.Network, networkNetNSPrefix)
		if !filepath.IsAbs(path) {
			return nil, errorf(errdefs.ErrInvalidArgument, "--network %s: the namespace path must be absolute", s.Network)
		}
		return []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: path})}, nil
	}
	return nil, errorf(errdefs.ErrInvalidArgument, "--network %q: want user, none or netns:PATH", s.Network)
}

// userNetworkFiles writes the resolv.conf and hosts of a box on QEMU's user
// network into dir and returns their bind mounts.
func userNetworkFiles(dir string) ([]specs.Mount, error) {
	files := []struct{ name, dest, content string }{
		{"resolv.conf", "/etc/resolv.conf", "nameserver 10.0.2.3\n"},
		{"hosts", "/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"},
	}
	var mounts []specs.Mount
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if err := os.WriteFile(p, []byte(f.content), 0o644); err != nil {
			return nil, fmt.Errorf("bundle: %w", err)
		}
		mounts = append(mounts, specs.Mount{Destination: f.dest, Type: "bind", Source: p, Options: []string{"rbind", "rw"}})
	}
	return mounts, nil
}

// volumeMounts returns the bind mounts of the volumes.
func volumeMounts(vols []Volume) []specs.Mount {
	var out []specs.Mount
	for _, v := range vols {
		mode := "rw"
		if v.ReadOnly {
			mode = "ro"
		}
		out = append(out, specs.Mount{Destination: v.Destination, Type: "bind", Source: v.Source, Options: []string{"rbind", mode}})
	}
	return out
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
// shim shares it with the VM). Files the box's network needs are written
// into dir, its bundle.
func GenerateSpec(id, dir string, s BoxSpec) (*specs.Spec, error) {
	if len(s.Args) == 0 {
		return nil, errorf(errdefs.ErrInvalidArgument, "no command given")
	}
	netOpts, err := networkOpts(s, dir)
	if err != nil {
		return nil, err
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
	if s.Privileged {
		// As nerdctl run --privileged, but the devices are the guest's:
		// the host's device list means nothing in the VM.
		opts = append(opts, oci.WithPrivileged, oci.WithAllDevicesAllowed)
	}
	if len(s.Annotations) > 0 {
		opts = append(opts, oci.WithAnnotations(s.Annotations))
	}
	opts = append(opts, netOpts...)
	opts = append(opts, oci.WithMounts(volumeMounts(s.Volumes)))
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
