package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// TestServeHealthOptOut (LESSONS 8, 9): a box created with health checks
// disabled gets no health event and inspect says so, and is still reaped
// and reported when its VMM dies; custom settings travel intact (a 1 s
// interval, 1 s timeout and 1 retry make transitions the defaults of 30 s,
// 10 s and 3 could not make in time).
func TestServeHealthOptOut(t *testing.T) {
	m := newMgr(t)
	d := m.serve(nil)
	el := subscribe(t, d.c)
	disabled := true
	off := serveBox(t, d.c, api.CreateRequest{Rootfs: m.rootfs, Cmd: []string{"sleep", "1000"}, HealthCheckDisabled: &disabled})
	fast := serveBox(t, d.c, api.CreateRequest{Rootfs: m.rootfs, Cmd: []string{"sleep", "1000"},
		HealthCheck: &api.HealthCheck{Interval: "1s", StartPeriod: "0s", Timeout: "1s", Retries: 1}})
	started := time.Now()
	var seen []api.Event
	var health []api.Event
	waitHealth := func(want string, bound time.Duration) {
		t.Helper()
		since := time.Now()
		for {
			ev := el.next(t, "/tasks/health", fast.ID, bound, &seen)
			health = append(health, ev)
			if ev.Health == want {
				t.Logf("health %s after %v", want, time.Since(since).Round(time.Millisecond))
				return
			}
		}
	}
	// The default interval would make the first probe 30 s after start.
	waitHealth("healthy", 20*time.Second)
	if d := time.Since(started); d > 20*time.Second {
		t.Errorf("first health event %v after start: the 1s interval was not applied", d)
	}
	if err := syscall.Kill(fast.VMMPid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitHealth("unhealthy", 20*time.Second)
	if err := syscall.Kill(fast.VMMPid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitHealth("healthy", time.Minute)
	if len(health) < 3 {
		t.Errorf("%d health events of the checked box, want at least 3: %v", len(health), health)
	}
	for _, ev := range seen {
		if ev.Topic == "/tasks/health" && ev.ID != fast.ID {
			t.Errorf("health event of box %s (the disabled box is %s): %v", ev.ID, off.ID, ev)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	if b, err := d.c.Inspect(ctx, off.ID); err != nil || b.Health != "disabled" && b.Health != "" {
		t.Errorf("inspect of the disabled box: health %q (%v), want disabled", b.Health, err)
	}
	if b, err := d.c.Inspect(ctx, fast.ID); err != nil || b.Health != "healthy" {
		t.Errorf("inspect of the checked box: health %q (%v), want healthy", b.Health, err)
	}

	// Reaping does not depend on health checks.
	if err := syscall.Kill(off.VMMPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev := el.next(t, "/tasks/exit", off.ID, deathBound, &seen)
	if !ev.Exited || ev.ExitStatus != 137 {
		t.Errorf("exit event of the disabled box %v, want 137", ev)
	}
	goneWithin(t, "VMM", off.VMMPid, deathBound)
	if b, err := d.c.Inspect(ctx, off.ID); err != nil || b.Status != "stopped" || b.ExitStatus != 137 {
		t.Errorf("inspect of the disabled box after its VMM died: %s %d (%v), want stopped 137", b.Status, b.ExitStatus, err)
	}
	if err := d.c.Remove(ctx, off.ID, false); err != nil {
		t.Errorf("remove the disabled box: %v", err)
	}
	if err := d.c.Remove(ctx, fast.ID, true); err != nil {
		t.Errorf("force-remove the checked box: %v", err)
	}
	goneWithin(t, "shim", off.ShimPid, deathBound)
	goneWithin(t, "shim", fast.ShimPid, deathBound)
}

// TestServeRestartKeepsBoxesRunning: the daemon's exit leaves its boxes
// running (their shims reparent to the daemon's own subreaper), and a new
// daemon on the state directory drives them; with --stop-boxes-on-exit
// they stop with it.
func TestServeRestartKeepsBoxesRunning(t *testing.T) {
	t.Run("restart", func(t *testing.T) {
		m := newMgr(t)
		d1 := m.serve(nil)
		b := serveBox(t, d1.c, sleepBox(m.rootfs))
		d1.stop()
		shim := reaper.Identity{Pid: b.ShimPid, StartTime: b.ShimStartTime}
		vmm := reaper.Identity{Pid: b.VMMPid, StartTime: b.VMMStartTime}
		for _, p := range []struct {
			what string
			id   reaper.Identity
		}{{"shim", shim}, {"VMM", vmm}} {
			if ok, err := p.id.Running(); !ok {
				t.Fatalf("%s pid %d died with the daemon: %s (%v)", p.what, p.id.Pid, procStatus(p.id.Pid), err)
			}
		}

		d2 := m.serve(nil)
		ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
		defer cancel()
		boxes, err := d2.c.List(ctx, api.ListFilter{})
		if err != nil || len(boxes) != 1 || boxes[0].ID != b.ID || boxes[0].Status != "running" {
			t.Fatalf("list after restart: %+v (%v), want box %s running", boxes, err, b.ID)
		}
		var out, errOut bytes.Buffer
		e, err := d2.c.Exec(ctx, b.ID, api.ExecRequest{Cmd: []string{"echo", "hi"}}, api.Stdio{Stdout: &out, Stderr: &errOut})
		if err != nil || e.Status != 0 || out.String() != "hi\n" {
			t.Fatalf("exec echo hi after restart: exit %d (%v), stdout %q, stderr %q", e.Status, err, out.String(), errOut.String())
		}
		if err := d2.c.Kill(ctx, b.ID, api.KillRequest{Signal: "KILL"}); err != nil {
			t.Fatalf("kill: %v", err)
		}
		if e, err := d2.c.Wait(ctx, b.ID); err != nil || e.Status != 137 {
			t.Fatalf("wait after SIGKILL: %d (%v), want 137", e.Status, err)
		}
		if err := d2.c.Remove(ctx, b.ID, false); err != nil {
			t.Fatalf("remove: %v", err)
		}
		// The shim is the test process's child now (it reparented when
		// the first daemon exited): it is reaped here.
		waitGone(t, "shim", b.ShimPid)
		waitGone(t, "VMM", b.VMMPid)
	})
	t.Run("stop-boxes-on-exit", func(t *testing.T) {
		m := newMgr(t)
		d := m.serve(nil, "--stop-boxes-on-exit")
		b := serveBox(t, d.c, sleepBox(m.rootfs))
		d.stop()
		waitGone(t, "shim", b.ShimPid)
		waitGone(t, "VMM", b.VMMPid)
		if st := m.inspect(b.ID, "{{.Status}}"); st != "stopped" {
			t.Errorf("status after the daemon stopped its boxes: %q, want stopped", st)
		}
		m.ok("rm", b.ID)
	})
}

// httpAnswer is one raw answer of the daemon.
type httpAnswer struct {
	status int
	body   []byte
}

// rawRequest sends method path with body through hc (to any host: the
// transport dials the daemon).
func rawRequest(t *testing.T, hc *http.Client, method, path, contentType string, body io.Reader, hdr http.Header) httpAnswer {
	t.Helper()
	req, err := http.NewRequest(method, "http://boxlite"+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return httpAnswer{status: resp.StatusCode, body: data}
}

// fdCount is how many fds pid has open.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestServeBadInput: every bad request gets its 4xx with a {code, message}
// body and never a Go stack; a client that opens the events stream and
// never reads it slows nobody and leaves nothing behind.
func TestServeBadInput(t *testing.T) {
	m := newMgr(t)
	d := m.serve(nil)
	hc := unixHTTPClient(d.sock)
	b := serveBox(t, d.c, sleepBox(m.rootfs))
	huge := `{"rootfs":"` + strings.Repeat("a", 1<<20) + `","cmd":["true"]}`
	tests := []struct {
		name, method, path, body string
		want                     int
		// message must be in the error's message.
		message string
	}{
		{"malformed JSON", "POST", "/v1/boxes", `{"rootfs":`, 400, "malformed JSON"},
		{"unknown field", "POST", "/v1/boxes", `{"rootfs":"` + m.rootfs + `","cmd":["true"],"bogus_field":1}`, 400, "bogus_field"},
		{"missing rootfs", "POST", "/v1/boxes", `{"cmd":["true"]}`, 400, "rootfs"},
		{"relative rootfs", "POST", "/v1/boxes", `{"rootfs":"rootfs","cmd":["true"]}`, 400, "absolute"},
		{"invalid image", "POST", "/v1/boxes", `{"image":"Not A Ref","cmd":["true"]}`, 400, "invalid image reference"},
		{"body over 1 MiB", "POST", "/v1/boxes", huge, 413, ""},
		{"inspect unknown box", "GET", "/v1/boxes/nosuchbox", "", 404, "nosuchbox"},
		{"delete unknown box", "DELETE", "/v1/boxes/nosuchbox", "", 404, "nosuchbox"},
		{"start unknown box", "POST", "/v1/boxes/nosuchbox/start", "", 404, "nosuchbox"},
		{"kill unknown box", "POST", "/v1/boxes/nosuchbox/kill", `{"signal":"KILL"}`, 404, "nosuchbox"},
		{"start a running box", "POST", "/v1/boxes/" + b.ID + "/start", "", 409, "running"},
		{"delete a running box", "DELETE", "/v1/boxes/" + b.ID, "", 409, "running"},
		{"bad signal", "POST", "/v1/boxes/" + b.ID + "/kill", `{"signal":"NOPE"}`, 400, "NOPE"},
		{"bad force", "DELETE", "/v1/boxes/" + b.ID + "?force=maybe", "", 400, "force"},
		{"unknown route", "GET", "/v1/nothing/here", "", 404, "/v1/nothing/here"},
		// A path served for other methods: 404 or 405, never a stack.
		{"wrong method", "PUT", "/v1/boxes", "", 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			a := rawRequest(t, hc, tt.method, tt.path, "application/json", body, nil)
			if a.status != tt.want && !(tt.want == 0 && (a.status == 404 || a.status == 405)) {
				t.Errorf("%s %s: %d %q, want %d", tt.method, tt.path, a.status, clipStr(string(a.body)), tt.want)
			}
			e := apiErrorBody(t, tt.name, a.body)
			if !strings.Contains(e.Message, tt.message) {
				t.Errorf("%s %s: message %q does not name %q", tt.method, tt.path, e.Message, tt.message)
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	if got, err := d.c.Inspect(ctx, b.ID); err != nil || got.Status != "running" {
		t.Errorf("the box after the bad requests: %s (%v), want running", got.Status, err)
	}
	if err := d.c.Remove(ctx, b.ID, true); err != nil {
		t.Fatalf("force-remove: %v", err)
	}

	t.Run("slow events client", func(t *testing.T) { testSlowEventsClient(t, m, d) })
}

// testSlowEventsClient opens GET /v1/events and never reads it while boxes
// come and go (publishing events): other requests answer promptly, and once
// its connection is closed the daemon's fds come back.
func testSlowEventsClient(t *testing.T, m *mgr, d *daemon) {
	hc := unixHTTPClient(d.sock)
	d.c.Close()
	before := fdCount(t, d.Pid())
	conn, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.UnixConn).SetReadBuffer(4096)
	if _, err := io.WriteString(conn, "GET /v1/events HTTP/1.1\r\nHost: boxlite\r\nAccept: text/event-stream\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Meanwhile, other clients: every answer must come promptly.
	stop := make(chan struct{})
	worst := make(chan time.Duration, 1)
	go func() {
		var longest time.Duration
		defer func() { worst <- longest }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			start := time.Now()
			resp, err := hc.Get("http://boxlite/v1/version")
			if err != nil {
				t.Errorf("GET /v1/version with a slow events client: %v", err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			longest = max(longest, time.Since(start))
		}
	}()
	// stopPoller ends the poller (also when the test fails half-way) and
	// returns its longest wait.
	stopPoller := sync.OnceValue(func() time.Duration {
		close(stop)
		return <-worst
	})
	defer stopPoller()
	ctx, cancel := context.WithTimeout(context.Background(), boxTimeout)
	defer cancel()
	for i := 0; i < 3; i++ {
		b := serveBox(t, d.c, sleepBox(m.rootfs))
		start := time.Now()
		if _, err := d.c.List(ctx, api.ListFilter{}); err != nil {
			t.Errorf("list with a slow events client: %v", err)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("list with a slow events client took %v", took)
		}
		if err := d.c.Remove(ctx, b.ID, true); err != nil {
			t.Fatalf("force-remove %s: %v", b.ID, err)
		}
		goneWithin(t, "shim", b.ShimPid, reapBound)
	}
	if w := stopPoller(); w > 2*time.Second {
		t.Errorf("GET /v1/version took up to %v while a client did not read its events", w)
	}
	// The slow client saw its stream open at least.
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	head := make([]byte, 64)
	if n, err := io.ReadAtLeast(conn, head, 12); err != nil || !strings.HasPrefix(string(head[:n]), "HTTP/1.1 200") {
		t.Errorf("events answer %q (%v), want 200", head[:n], err)
	}
	conn.Close()
	d.c.Close()
	// The daemon closes its end: no fd (or goroutine holding one) is left.
	const slack = 2
	var last int
	if err := within(10*time.Second, func() error {
		if last = fdCount(t, d.Pid()); last > before+slack {
			return fmt.Errorf("%d fds, %d before the slow client", last, before)
		}
		return nil
	}); err != nil {
		t.Errorf("daemon fds after the slow client went away: %v", err)
	}
	// ...and the count does not keep growing.
	time.Sleep(500 * time.Millisecond)
	if now := fdCount(t, d.Pid()); now > before+slack {
		t.Errorf("daemon fds grow: %d, then %d (%d before the slow client)", last, now, before)
	}
	t.Logf("daemon fds: %d before the slow client, %d after", before, last)
}

// TestServeAuth: a TCP listener needs a bearer token (and TLS off
// loopback), refused at start otherwise; requests without the token are
// 401; the unix socket is 0660.
func TestServeAuth(t *testing.T) {
	m := newMgr(t)
	port := freePort(t)
	tcp := fmt.Sprintf("tcp://127.0.0.1:%d", port)
	if r := m.run(nil, "serve", "--listen", tcp); r.code != 2 || !strings.Contains(r.stderr, "--token-file") {
		t.Errorf("serve on TCP without --token-file: %v, want exit 2 naming --token-file", r)
	}
	tokenFile := filepath.Join(shortTempDir(t), "token")
	const token = "s3cret-token-for-the-test"
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wide := fmt.Sprintf("tcp://0.0.0.0:%d", port)
	if r := m.run(nil, "serve", "--listen", wide, "--token-file", tokenFile); r.code != 2 || !strings.Contains(r.stderr, "--tls-cert") {
		t.Errorf("serve on %s without TLS: %v, want exit 2 naming --tls-cert", wide, r)
	}

	d := m.serve(nil, "--listen", tcp, "--token-file", tokenFile)
	if fi, err := os.Stat(d.sock); err != nil || fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("unix socket %s: %v (%v), want a socket of mode 0660", d.sock, fi.Mode(), err)
	}
	hc := &http.Client{Timeout: time.Minute}
	get := func(auth string) httpAnswer {
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/v1/boxes", port), nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET /v1/boxes over TCP: %v", err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return httpAnswer{resp.StatusCode, data}
	}
	for _, tt := range []struct{ name, auth string }{
		{"no token", ""},
		{"wrong token", "Bearer not-the-token"},
		{"token without Bearer", token},
		{"token with a suffix", "Bearer " + token + "x"},
	} {
		a := get(tt.auth)
		if a.status != http.StatusUnauthorized {
			t.Errorf("%s: %d %q, want 401", tt.name, a.status, a.body)
		}
		if e := apiErrorBody(t, tt.name, a.body); e.Code != api.CodeUnauthorized {
			t.Errorf("%s: code %q, want %q", tt.name, e.Code, api.CodeUnauthorized)
		}
	}
	if a := get("Bearer " + token); a.status != http.StatusOK {
		t.Errorf("with the token: %d %q, want 200", a.status, a.body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.New(tcp, client.Options{Token: token})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if boxes, err := c.List(ctx, api.ListFilter{}); err != nil || len(boxes) != 0 {
		t.Errorf("list with the token: %v (%v), want no box", boxes, err)
	}
	bad, _ := client.New(tcp, client.Options{Token: "wrong"})
	defer bad.Close()
	if _, err := bad.List(ctx, api.ListFilter{}); !errdefs.IsUnauthorized(err) && !isCode(err, api.CodeUnauthorized) {
		t.Errorf("list with a wrong token: %v, want unauthorized", err)
	}
	// The unix socket needs no token (its mode guards it).
	if _, err := d.c.List(ctx, api.ListFilter{}); err != nil {
		t.Errorf("list over the unix socket: %v", err)
	}
}

// isCode says err is an *api.Error with code.
func isCode(err error, code string) bool {
	e, ok := err.(*api.Error)
	return ok && e.Code == code
}

// TestServeCLIMatchesLocal: the CLI gives the same exit codes and output
// through the daemon (--url) as locally.
func TestServeCLIMatchesLocal(t *testing.T) {
	local := newMgr(t)
	remote := newMgr(t)
	d := remote.serve(nil)
	type mode struct {
		name string
		m    *mgr
		// pre goes before the subcommand.
		pre []string
	}
	modes := []mode{{"local", local, nil}, {"daemon", remote, []string{"--url", d.url}}}
	// both runs args (with {R} the mode's rootfs, {ID} its box) in both
	// modes and fails unless exit codes and stdout (ids normalized) match
	// each other and want.
	ids := map[string]string{}
	both := func(stdin []byte, want mgrResult, checkStderr bool, args ...string) [2]mgrResult {
		t.Helper()
		var res [2]mgrResult
		for i, md := range modes {
			a := append([]string{}, md.pre...)
			for _, s := range args {
				s = strings.ReplaceAll(s, "{R}", md.m.rootfs)
				s = strings.ReplaceAll(s, "{ID}", ids[md.name])
				a = append(a, s)
			}
			r := md.m.run(stdin, a...)
			if id := ids[md.name]; id != "" {
				r.stdout = strings.ReplaceAll(r.stdout, id, "{ID}")
			}
			res[i] = r
		}
		if res[0].code != res[1].code || res[0].stdout != res[1].stdout {
			t.Errorf("boxlite %v: local %v, daemon %v", args, res[0], res[1])
		}
		for i, r := range res {
			if r.code != want.code || want.stdout != "\x00" && r.stdout != want.stdout || checkStderr && r.stderr != want.stderr {
				t.Errorf("boxlite %v (%s): %v, want exit %d, stdout %q", args, modes[i].name, r, want.code, want.stdout)
			}
		}
		return res
	}
	both(nil, mgrResult{code: 3, stdout: "out\n", stderr: "err\n"}, true,
		"run", "--rm", "--rootfs", "{R}", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
	both([]byte("hello"), mgrResult{code: 0, stdout: "hello"}, false,
		"run", "-i", "--rm", "--rootfs", "{R}", "--", "cat")

	// A detached box: exec, logs, inspect, kill, rm.
	for _, md := range modes {
		a := append(append([]string{}, md.pre...), "run", "-d", "--rootfs", md.m.rootfs, "--", "sh", "-c", "echo started; exec sleep 1000")
		r := md.m.run(nil, a...)
		id := strings.TrimSpace(r.stdout)
		if r.code != 0 || id == "" || strings.Contains(id, "\n") {
			t.Fatalf("run -d (%s): %v", md.name, r)
		}
		ids[md.name] = id
	}
	both(nil, mgrResult{code: 4}, false, "exec", "{ID}", "--", "sh", "-c", "exit 4")
	// The box's first line may not be in its log yet.
	for _, md := range modes {
		if err := within(time.Minute, func() error {
			a := append(append([]string{}, md.pre...), "logs", ids[md.name])
			if r := md.m.run(nil, a...); r.stdout != "started\n" {
				return fmt.Errorf("%v", r)
			}
			return nil
		}); err != nil {
			t.Errorf("logs (%s): %v", md.name, err)
		}
	}
	both(nil, mgrResult{code: 0, stdout: "started\n"}, false, "logs", "{ID}")
	both(nil, mgrResult{code: 0, stdout: "running\n"}, false, "inspect", "--format", "{{.Status}}", "{ID}")
	both(nil, mgrResult{code: 0, stdout: "\x00"}, false, "kill", "-s", "KILL", "{ID}")
	for _, md := range modes {
		if err := within(time.Minute, func() error {
			a := append(append([]string{}, md.pre...), "inspect", "--format", "{{.Status}} {{.ExitStatus}}", ids[md.name])
			if r := md.m.run(nil, a...); strings.TrimSpace(r.stdout) != "stopped 137" {
				return fmt.Errorf("%v", r)
			}
			return nil
		}); err != nil {
			t.Errorf("status after kill -s KILL (%s): %v", md.name, err)
		}
	}
	both(nil, mgrResult{code: 0, stdout: "stopped 137\n"}, false, "inspect", "--format", "{{.Status}} {{.ExitStatus}}", "{ID}")
	both(nil, mgrResult{code: 0, stdout: "{ID}\n"}, false, "rm", "{ID}")
	res := both(nil, mgrResult{code: 1, stdout: ""}, false, "rm", "nosuchbox")
	for i, r := range res {
		if !strings.Contains(r.stderr, "nosuchbox") {
			t.Errorf("rm nosuchbox (%s): stderr %q does not name the box", modes[i].name, r.stderr)
		}
	}
}
