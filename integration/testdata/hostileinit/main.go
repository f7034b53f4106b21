// Command hostileinit is a guest /init for the integration tests
// (hostile_guest_test.go), never shipped: it plays boxlite-agent just well
// enough to be trusted, then breaks the agent protocol on purpose.
//
// It opens the virtio-serial port named "agent" as boxlite-agent does,
// answers the host's readiness pings properly, answers the calls that
// create and start a container with empty successes, holds the long polls
// (Events, ReadStdio, WaitProcess) unanswered, and misbehaves at a chosen
// point in one of these modes:
//
//	oversize     a response header announcing 16 MiB
//	flood        the same reply again and again, as fast as the port
//	             takes it: at "create" the answer to the last ping, at
//	             "running" an answer to the held Events poll (256 events
//	             about containers the host does not know)
//	unsolicited  responses on stream ids the host never opened, one every
//	             10 ms, forever
//	stall        a response header announcing 4 KiB, 100 bytes of it, then
//	             nothing more (it keeps reading the host's requests)
//	oomstorm     no violation: once the container runs, every Events poll
//	             is answered at once with 256 OOM events for it; a signal
//	             to the container makes it report its exit (137)
//	deaf         no violation: it answers every call (a signal too) and
//	             never reports an exit, as a guest whose agent lost track
//	             of its processes, or lies
//
// The point is "create" (instead of answering CreateContainer) or "running"
// (once StartContainer was answered and an Events poll is held, which then
// gets the broken answer). The mode comes from boxlite.hostile=MODE[@POINT]
// on the kernel command line, else from the file /hostile in the initramfs
// (the shim has no option for kernel arguments); the point defaults to
// running. After misbehaving the guest answers nothing, except that
// Shutdown still reboots it. It logs what it does on the console
// (hostile: ...).
package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// ttrpc framing (github.com/containerd/ttrpc channel.go).
const (
	headerLen    = 10
	typeRequest  = 1
	typeResponse = 2
)

func main() {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		_ = os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil {
			logf("mount %s: %v", m.dst, err)
		}
	}
	mode, point := params()
	logf("mode %s at %s", mode, point)
	port, err := findPort("agent")
	if err != nil {
		logf("%v", err)
		reboot()
	}
	f, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		logf("open %s: %v", port, err)
		reboot()
	}
	g := &guest{f: f, mode: mode, point: point}
	err = g.serve()
	logf("port closed: %v", err)
	reboot()
}

// logf writes a line to the console, which the host keeps (ConsoleTail).
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hostile: "+format+"\n", args...)
}

// params returns the mode and point from the kernel command line, else
// from /hostile.
func params() (mode, point string) {
	spec := ""
	if data, err := os.ReadFile("/hostile"); err == nil {
		spec = strings.TrimSpace(string(data))
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, "boxlite.hostile="); ok {
			spec = v
		}
	}
	mode, point, _ = strings.Cut(spec, "@")
	if point == "" {
		point = "running"
	}
	return mode, point
}

// findPort returns the device of the virtio-serial port called name, which
// appears shortly after boot.
func findPort(name string) (string, error) {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		dirs, _ := filepath.Glob("/sys/class/virtio-ports/*")
		for _, d := range dirs {
			n, err := os.ReadFile(filepath.Join(d, "name"))
			if err != nil || strings.TrimSpace(string(n)) != name {
				continue
			}
			dev := "/dev/" + filepath.Base(d)
			if _, err := os.Stat(dev); err == nil {
				return dev, nil
			}
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q", name)
}

// reboot ends the VM (QEMU runs with -no-reboot).
func reboot() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}

// guest serves one host session on the port.
type guest struct {
	f           *os.File
	mode, point string

	// writeMu serialises writes to the port.
	writeMu sync.Mutex
	// answered is the last stream answered.
	answered uint32
	// container is the id CreateContainer named.
	container string
	// seq numbers the events of oomstorm.
	seq uint64
	// signalled says the host signalled the container (oomstorm).
	signalled bool
	// events is the stream of the Events poll being held (0: none).
	events uint32
	// started says StartContainer was answered.
	started bool
	// hostile says the guest misbehaved: it answers nothing any more.
	hostile bool
}

// serve reads the host's requests until the port fails.
func (g *guest) serve() error {
	var hdr [headerLen]byte
	for {
		if _, err := io.ReadFull(g.f, hdr[:]); err != nil {
			return err
		}
		length := binary.BigEndian.Uint32(hdr[0:4])
		stream := binary.BigEndian.Uint32(hdr[4:8])
		payload := make([]byte, length)
		if _, err := io.ReadFull(g.f, payload); err != nil {
			return err
		}
		if hdr[8] != typeRequest {
			continue
		}
		var req ttrpc.Request
		if err := proto.Unmarshal(payload, &req); err != nil {
			logf("undecodable request on stream %d: %v", stream, err)
			continue
		}
		g.handle(stream, &req)
	}
}

// handle answers one request, or misbehaves instead.
func (g *guest) handle(stream uint32, req *ttrpc.Request) {
	if req.Method == "Shutdown" {
		logf("shutdown")
		if !g.hostile {
			g.reply(stream, &api.Empty{})
		}
		reboot()
	}
	if g.hostile {
		return
	}
	switch req.Method {
	case "Ping":
		g.reply(stream, &api.PingResponse{Version: "hostile-" + g.mode, Runtime: "none"})
	case "CreateContainer":
		var r api.CreateContainerRequest
		_ = proto.Unmarshal(req.Payload, &r)
		g.container = r.Id
		if g.point == "create" {
			// The flood repeats an answer already given (the last
			// ping's); the others break the answer to this call.
			if g.mode == "flood" {
				g.misbehave(g.answered, &api.PingResponse{Version: "flood"})
			} else {
				g.misbehave(stream, &api.CreateContainerResponse{})
			}
			return
		}
		g.reply(stream, &api.CreateContainerResponse{})
	case "StartContainer":
		g.reply(stream, &api.StartContainerResponse{})
		g.started = true
	case "Events":
		g.events = stream
	case "ReadStdio", "WaitProcess":
		// Long polls: held, as a guest with nothing to say holds them.
	default:
		g.reply(stream, &api.Empty{})
	}
	if g.mode == "oomstorm" {
		g.storm(req.Method)
		return
	}
	if g.mode == "deaf" {
		return
	}
	if g.point == "running" && g.started && g.events != 0 {
		// The held Events poll gets the (broken) answer: 256 events
		// about containers the host does not know, which it ignores.
		evs := &api.EventsResponse{}
		for i := range 256 {
			evs.Events = append(evs.Events, &api.Event{Seq: uint64(i + 1), Kind: api.EventKind_EXIT, Id: fmt.Sprintf("ghost-%d", i)})
		}
		g.misbehave(g.events, evs)
	}
}

// storm plays oomstorm: within the protocol, every Events poll once the
// container runs is answered at once with as many OOM events as a reply may
// hold; once the host signalled the container, the next answer also says
// its init exited with 137, so the box can be stopped the ordinary way.
func (g *guest) storm(method string) {
	if method == "SignalProcess" {
		g.signalled = true
	}
	if !g.started || g.events == 0 {
		return
	}
	evs := &api.EventsResponse{}
	for len(evs.Events) < 256 {
		g.seq++
		e := &api.Event{Seq: g.seq, Kind: api.EventKind_OOM, Id: g.container}
		if g.signalled && len(evs.Events) == 255 {
			e = &api.Event{Seq: g.seq, Kind: api.EventKind_EXIT, Id: g.container, ExitStatus: 137, TimeUnixNs: time.Now().UnixNano()}
		}
		evs.Events = append(evs.Events, e)
	}
	g.reply(g.events, evs)
	g.events = 0
}

// misbehave breaks the protocol as the mode says, on stream (the call it
// should have answered with answer, or for flood one answered already).
func (g *guest) misbehave(stream uint32, answer proto.Message) {
	g.hostile = true
	logf("misbehaving (%s) on stream %d", g.mode, stream)
	switch g.mode {
	case "oversize":
		g.write(header(16<<20, stream, typeResponse))
	case "flood":
		msg := responseFrame(stream, answer)
		go func() {
			for n := 0; ; n++ {
				if err := g.write(msg); err != nil {
					logf("flood ended after %d replies: %v", n, err)
					return
				}
			}
		}()
	case "unsolicited":
		go func() {
			for id := uint32(1_000_001); ; id += 2 {
				if err := g.write(responseFrame(id, answer)); err != nil {
					logf("unsolicited replies ended at stream %d: %v", id, err)
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	case "stall":
		g.write(append(header(4096, stream, typeResponse), make([]byte, 100)...))
	default:
		logf("unknown mode %q: answering nothing", g.mode)
	}
}

// reply answers a request with a successful response.
func (g *guest) reply(stream uint32, m proto.Message) {
	_ = g.write(responseFrame(stream, m))
	g.answered = stream
}

func (g *guest) write(b []byte) error {
	g.writeMu.Lock()
	defer g.writeMu.Unlock()
	_, err := g.f.Write(b)
	return err
}

// responseFrame is a whole ttrpc response frame carrying m.
func responseFrame(stream uint32, m proto.Message) []byte {
	payload, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	resp, err := proto.Marshal(&ttrpc.Response{Payload: payload})
	if err != nil {
		panic(err)
	}
	return append(header(uint32(len(resp)), stream, typeResponse), resp...)
}

// header is a frame header announcing length bytes.
func header(length, stream uint32, typ byte) []byte {
	h := make([]byte, headerLen)
	binary.BigEndian.PutUint32(h[0:4], length)
	binary.BigEndian.PutUint32(h[4:8], stream)
	h[8] = typ
	return h
}
