package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runc "github.com/containerd/go-runc"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// frame encodes a ttrpc frame header and payload.
func frame(typ byte, payload string) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, uint32(len(payload)))
	binary.Write(&b, binary.BigEndian, uint32(1))
	b.WriteByte(typ)
	b.WriteByte(0)
	b.WriteString(payload)
	return b.Bytes()
}

func TestFrameCounterCountsCompleteFramesAcrossSplits(t *testing.T) {
	var stream []byte
	stream = append(stream, frame(frameResponse, "first")...)
	stream = append(stream, frame(frameRequest, "other")...)
	stream = append(stream, frame(frameResponse, "")...)
	stream = append(stream, frame(frameResponse, strings.Repeat("x", 100))...)
	for _, chunk := range []int{1, 3, 7, 10, 11, len(stream)} {
		var f frameCounter
		var n uint64
		for i := 0; i < len(stream); i += chunk {
			n += f.feed(stream[i:min(i+chunk, len(stream))], frameResponse)
		}
		if n != 3 {
			t.Fatalf("chunks of %d: counted %d responses, want 3", chunk, n)
		}
	}
	// A frame is counted only once its payload is complete.
	var f frameCounter
	full := frame(frameResponse, "payload")
	if n := f.feed(full[:len(full)-1], frameResponse); n != 0 {
		t.Fatalf("counted an incomplete frame")
	}
	if n := f.feed(full[len(full)-1:], frameResponse); n != 1 {
		t.Fatalf("did not count the completed frame")
	}
}

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		cmdline string
		want    bootParams
	}{
		{"console=ttyS0 reboot=t", bootParams{}},
		{"boxlite.debug=1 boxlite.runtime=runc", bootParams{debug: true, runtime: "runc"}},
		{"boxlite.debug=0 boxlite.runtime=/opt/crun", bootParams{runtime: "/opt/crun"}},
		{"boxlite.debug", bootParams{debug: true}},
	}
	for _, tt := range tests {
		t.Run(tt.cmdline, func(t *testing.T) {
			if got := parseCmdline(tt.cmdline); got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestRuntimeErrorCarriesTheRuntimeMessage(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "create.log")
	lines := `{"msg": "some warning", "level": "warning"}
{"msg": "executable file ` + "`nosuchbin`" + ` not found in $PATH: No such file or directory", "level": "error", "time": "x"}
not json at all
`
	os.WriteFile(log, []byte(lines), 0o600)
	err := runtimeError("crun create", errTest("exit status 1"), log)
	if !strings.Contains(err.Error(), "nosuchbin") || strings.Contains(err.Error(), "some warning") {
		t.Fatalf("error %q lacks the runtime's error or has noise", err)
	}
	// Without errors in the log, its last lines are used.
	os.WriteFile(log, []byte("plain failure\n"), 0o600)
	if err := runtimeError("runc exec", errTest("exit status 1"), log); !strings.Contains(err.Error(), "plain failure") {
		t.Fatalf("error %q lacks the log's last line", err)
	}
	// A missing log leaves the error as is.
	if err := runtimeError("x", errTest("boom"), filepath.Join(dir, "none")); err.Error() != "x: boom" {
		t.Fatalf("error %q", err)
	}
}

type errTest string

func (e errTest) Error() string { return string(e) }

func TestFindRuntime(t *testing.T) {
	if _, err := FindRuntime("nonesuch"); err == nil {
		t.Fatal("unknown runtime accepted")
	}
	if _, err := FindRuntime("/nonexistent/crun"); err == nil {
		t.Fatal("missing path accepted")
	}
	self, _ := os.Executable()
	rt, err := FindRuntime(self)
	if err != nil || rt.Path != self {
		t.Fatalf("got %+v, %v", rt, err)
	}
}

func TestMonitorReportsExitStatusThroughTheReaper(t *testing.T) {
	m := &reaperMonitor{r: reaper.Default()}
	tests := []struct {
		name   string
		script string
		want   int
	}{
		{"success", "exit 0", 0},
		{"exit code", "exit 3", 3},
		{"killed", "kill -9 $$", 137},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, start := range []func(*exec.Cmd) (chanExit, error){
				func(c *exec.Cmd) (chanExit, error) { return m.Start(c) },
				func(c *exec.Cmd) (chanExit, error) { return m.StartLocked(c) },
			} {
				var out bytes.Buffer
				cmd := exec.Command("sh", "-c", "echo out; "+tt.script)
				cmd.Stdout = &out
				ec, err := start(cmd)
				if err != nil {
					t.Fatal(err)
				}
				status, err := m.Wait(cmd, ec)
				if err != nil || status != tt.want {
					t.Fatalf("status %d, %v; want %d", status, err, tt.want)
				}
				if out.String() != "out\n" {
					t.Fatalf("stdout %q not complete after Wait", out.String())
				}
			}
		})
	}
}

type chanExit = chan runc.Exit

func TestFindPortByName(t *testing.T) {
	sys := t.TempDir()
	for name, port := range map[string]string{"vport0p1": "other", "vport0p2": "agent"} {
		os.MkdirAll(filepath.Join(sys, name), 0o755)
		os.WriteFile(filepath.Join(sys, name, "name"), []byte(port+"\n"), 0o644)
	}
	if dev, ok := lookupPort(sys, "agent"); !ok || dev != "/dev/vport0p2" {
		t.Fatalf("got %q %v, want /dev/vport0p2", dev, ok)
	}
	if _, ok := lookupPort(sys, "missing"); ok {
		t.Fatal("found a port that does not exist")
	}
	// The /dev node of a found port does not exist here: findPort gives up.
	if _, err := findPort(t.Context(), sys, "agent", 30*time.Millisecond); err == nil {
		t.Fatal("findPort succeeded without a device node")
	}
}

func TestPipeIOGivesUnrequestedStreamsDevNull(t *testing.T) {
	checkLeaks(t)
	tests := []struct {
		name  string
		stdio *api.Stdio
	}{
		{"none", &api.Stdio{}},
		{"stdout only", &api.Stdio{Stdout: true}},
		{"all", &api.Stdio{Stdin: true, Stdout: true, Stderr: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := newPipeIO(tt.stdio, os.Getuid(), os.Getgid())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			cmd := exec.Command("sh", "-c", "cat; echo out; echo err >&2")
			p.Set(cmd)
			for _, f := range []any{cmd.Stdin, cmd.Stdout, cmd.Stderr} {
				if _, ok := f.(*os.File); !ok {
					t.Fatalf("stdio %T is not a file: go-runc would capture it", f)
				}
			}
			if (p.Stdin() != nil) != tt.stdio.Stdin || (p.Stdout() != nil) != tt.stdio.Stdout || (p.Stderr() != nil) != tt.stdio.Stderr {
				t.Fatal("agent ends do not match the request")
			}
			m := &reaperMonitor{r: reaper.Default()}
			ec, err := m.Start(cmd)
			if err != nil {
				t.Fatal(err)
			}
			p.CloseAfterStart()
			if in := p.Stdin(); in != nil {
				in.Write([]byte("in\n"))
				in.Close()
			}
			var out []byte
			if r := p.Stdout(); r != nil {
				out, _ = io.ReadAll(r)
			}
			if status, _ := m.Wait(cmd, ec); status != 0 {
				t.Fatalf("status %d", status)
			}
			want := map[bool]string{true: "out\n", false: ""}[tt.stdio.Stdout]
			if tt.stdio.Stdin && tt.stdio.Stdout {
				want = "in\nout\n"
			}
			if string(out) != want {
				t.Fatalf("stdout %q, want %q", out, want)
			}
		})
	}
}

func TestHandlerPanicBecomesInternalError(t *testing.T) {
	info := &ttrpc.UnaryServerInfo{FullMethod: "/boxlite.agent.v1.Agent/Ping"}
	_, err := recoverPanics(t.Context(), nil, info, func(context.Context, func(any) error) (any, error) {
		panic("bug")
	})
	if st, ok := grpcstatus.FromError(err); !ok || st.Code() != codes.Internal || !strings.Contains(st.Message(), "bug") {
		t.Fatalf("err = %v, want an Internal status naming the panic", err)
	}
}
