package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/sandbox"
)

// Guests that never get going: a bad VM config, a guest that is never
// ready, dies during boot or breaks the protocol.

func TestGuestBadVMConfigGetsAClearError(t *testing.T) {
	rootfs := busyboxRootfs(t)
	file := filepath.Join(shortTempDir(t), "file")
	os.WriteFile(file, nil, 0o644)
	tests := []struct {
		name   string
		mutate func(*sandbox.Config)
		want   []string
	}{
		{"missing kernel", func(c *sandbox.Config) { c.VM.Kernel = "/nonexistent/vmlinux" }, []string{"/nonexistent/vmlinux", "make kernel"}},
		{"missing initrd", func(c *sandbox.Config) { c.VM.Initrd = "/nonexistent/initrd" }, []string{"/nonexistent/initrd", "make initramfs"}},
		{"missing share", func(c *sandbox.Config) { c.VM.Share = "/nonexistent/share" }, []string{"/nonexistent/share"}},
		{"share is a file", func(c *sandbox.Config) { c.VM.Share = file }, []string{file, "not a directory"}},
		{"qemu missing", func(c *sandbox.Config) { c.VM.QEMUBinary = "/nonexistent/qemu-system-x86_64" }, []string{"make setup"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := sandboxConfig(t, rootfs, vmOpts{})
			tt.mutate(&cfg)
			_, err := sandbox.Start(context.Background(), cfg)
			if err == nil {
				t.Fatal("sandbox started")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			assertNoLeaks(t, 0, rootfs)
		})
	}
}

func TestGuestThatNeverBecomesReadyIsStoppedWithItsConsole(t *testing.T) {
	initrd := fakeInitrd(t, "echo boxlite-marker-never-ready >/dev/ttyS0\nexec /bin/busybox sleep 1000\n")
	err := startExpectingFailure(t, vmOpts{initrd: initrd, bootTimeout: 8 * time.Second})
	for _, w := range []string{"not ready within 8s", "boxlite-marker-never-ready"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
}

func TestGuestThatDiesDuringBootIsReportedWithItsConsole(t *testing.T) {
	err := startExpectingFailure(t, vmOpts{kernelArgs: []string{"rdinit=/nonexistent"}, bootTimeout: 60 * time.Second})
	for _, w := range []string{"exited during boot", "Kernel panic"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
}

func TestGuestSendingGarbageIsCutOffAndStopped(t *testing.T) {
	tests := []struct {
		name, payload string
	}{
		{"text", `garbage from the guest`},
		{"oversized frame", `\177\377\377\377\000\000\000\001\002\000`},
		{"frame on a stream the host never opened", `\000\000\000\001\000\000\000\002\002\000x`},
		{"request from the guest", `\000\000\000\001\000\000\000\001\001\000x`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			script := `for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = agent ] && port=/dev/${p##*/}; done
exec 3>$port
while :; do printf '` + tt.payload + `' >&3; sleep 1; done
`
			err := startExpectingFailure(t, vmOpts{initrd: fakeInitrd(t, script), bootTimeout: 30 * time.Second})
			if !errors.Is(err, agent.ErrProtocol) {
				t.Fatalf("error %v; want a protocol violation", err)
			}
		})
	}
}

// startExpectingFailure starts a sandbox that must fail to boot, and checks
// that nothing of it is left.
func startExpectingFailure(t *testing.T, o vmOpts) error {
	t.Helper()
	rootfs := busyboxRootfs(t)
	cfg := sandboxConfig(t, rootfs, o)
	sb, err := sandbox.Start(context.Background(), cfg)
	if err == nil {
		sb.Kill()
		t.Fatal("sandbox started")
	}
	pid := 0
	if id, perr := readPidFile(cfg.VM.StateDir); perr == nil {
		pid = id
		t.Errorf("pid file left behind for pid %d", id)
	}
	assertNoLeaks(t, pid, rootfs)
	t.Logf("boot error (expected): %v", err)
	return err
}

func readPidFile(dir string) (int, error) {
	data, err := os.ReadFile(filepath.Join(dir, "vmm.pid"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.Fields(string(data))[0])
}
