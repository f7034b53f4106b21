package manager

import (
	"bytes"
	"strings"
	"testing"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"google.golang.org/protobuf/proto"
)

func TestParseBootstrapResultAcceptsWhatContainerdAccepts(t *testing.T) {
	pb, _ := proto.Marshal(&bootapi.BootstrapResult{Version: 3, Address: "unix:///run/boxlite/s/abc", Protocol: "ttrpc"})
	grpcPB, _ := proto.Marshal(&bootapi.BootstrapResult{Version: 3, Address: "unix:///run/boxlite/s/abc", Protocol: "grpc"})
	tests := []struct {
		name     string
		out      []byte
		wantAddr string
		wantErr  string
	}{
		{name: "protobuf", out: pb, wantAddr: "unix:///run/boxlite/s/abc"},
		{name: "json", out: []byte(`{"version":3,"address":"unix:///run/boxlite/s/abc","protocol":"ttrpc"}`), wantAddr: "unix:///run/boxlite/s/abc"},
		{name: "plain address", out: []byte("unix:///run/boxlite/s/abc\n"), wantAddr: "unix:///run/boxlite/s/abc"},
		{name: "plain path", out: []byte("/run/boxlite/s/abc"), wantAddr: "/run/boxlite/s/abc"},
		{name: "abstract socket", out: []byte("unix://@boxlite-abc"), wantAddr: "unix://@boxlite-abc"},
		{name: "garbage", out: []byte("shim: something went wrong"), wantErr: "no usable address"},
		{name: "empty", out: nil, wantErr: "no usable address"},
		{name: "binary garbage", out: []byte{0xff, 0x00, 0x13, 0x37}, wantErr: "no usable address"},
		{name: "oversized", out: bytes.Repeat([]byte("a"), maxShimOutput+1), wantErr: "more than 65536"},
		{name: "grpc", out: grpcPB, wantErr: "ttrpc only"},
		{name: "future version", out: []byte(`{"version":4,"address":"unix:///x","protocol":"ttrpc"}`), wantErr: "unsupported shim version (4)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseBootstrapResult(tt.out)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %+v, %v; want error %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Address != tt.wantAddr || got.Protocol != "ttrpc" {
				t.Fatalf("got %+v, %v; want %s over ttrpc", got, err, tt.wantAddr)
			}
		})
	}
}

func TestShimCommandLineIsContainerds(t *testing.T) {
	c := shimCommand{binary: "/bin/shim", self: "/bin/boxlite", grpcAddress: "/st/grpc.sock", ttrpcAddress: "/st/events.sock", socketDir: "/st/s"}
	got := strings.Join(c.args("b1", "", "start"), " ")
	want := "-namespace boxlite -address /st/grpc.sock -publish-binary /bin/boxlite -id b1 start"
	if got != want {
		t.Errorf("start args %q, want %q", got, want)
	}
	got = strings.Join(c.args("b1", "/st/boxes/b1/bundle", "delete"), " ")
	want = "-namespace boxlite -address /st/grpc.sock -publish-binary /bin/boxlite -id b1 -bundle /st/boxes/b1/bundle delete"
	if got != want {
		t.Errorf("delete args %q, want %q", got, want)
	}
	cmd := c.cmd("/st/boxes/b1/bundle", nil)
	env := strings.Join(cmd.Env, "\n")
	for _, kv := range []string{"TTRPC_ADDRESS=/st/events.sock", "GRPC_ADDRESS=/st/grpc.sock", "NAMESPACE=boxlite"} {
		if !strings.Contains(env, kv) {
			t.Errorf("env lacks %s", kv)
		}
	}
	if cmd.Dir != "/st/boxes/b1/bundle" || cmd.SysProcAttr == nil || !cmd.SysProcAttr.Setpgid {
		t.Errorf("cwd %q / own process group %v", cmd.Dir, cmd.SysProcAttr)
	}
	p := c.params("b1")
	if p.GetInstanceID() != "b1" || p.GetNamespace() != "boxlite" || p.GetSocketDir() != "/st/s" ||
		p.GetContainerdTtrpcAddress() != "/st/events.sock" || p.GetContainerdGrpcAddress() != "/st/grpc.sock" || p.GetContainerdBinary() != "/bin/boxlite" {
		t.Errorf("bootstrap params %v", p)
	}
}

// The limits go into the spec as resources; the shim sizes the VM from them
// (pkg/shim's TestVMIsSizedToFitTheLimits).
func TestGenerateSpecSetsTheLimits(t *testing.T) {
	tests := []struct {
		name         string
		mem          uint64
		cpus         float64
		wantQuota    int64
		wantMemLimit int64
	}{
		{name: "defaults"},
		{name: "memory", mem: 1 << 30, wantMemLimit: 1 << 30},
		{name: "fractional cpus", cpus: 1.5, wantQuota: 150000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := GenerateSpec("b1", t.TempDir(), BoxSpec{Args: []string{"true"}, Rootfs: "/r", MemoryBytes: tt.mem, CPUs: tt.cpus})
			if err != nil {
				t.Fatal(err)
			}
			var limit, quota int64
			if r := s.Linux.Resources; r != nil && r.Memory != nil && r.Memory.Limit != nil {
				limit = *r.Memory.Limit
			}
			if r := s.Linux.Resources; r != nil && r.CPU != nil && r.CPU.Quota != nil {
				quota = *r.CPU.Quota
			}
			if limit != tt.wantMemLimit || quota != tt.wantQuota {
				t.Errorf("memory limit %d, cpu quota %d", limit, quota)
			}
			if s.Root.Path != "/r" || !strings.HasPrefix(s.Process.Env[0], "PATH=") {
				t.Errorf("root %q, env %v", s.Root.Path, s.Process.Env)
			}
		})
	}
}
