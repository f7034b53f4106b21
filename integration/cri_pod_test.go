package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/internal/poll"
)

// criTestImage is critest's busybox, served by the CRI harness's registry.
const criTestImage = "registry.k8s.io/e2e-test-images/busybox:1.29-2"

// criPod is one pod made with crictl.
type criPod struct {
	e *criEnv
	// id is the pod sandbox's id; config its config file.
	id, config string
	// dir holds the pod's config files and logs.
	dir string
}

// runPod writes a pod config (pod-level pid namespace when sharePID) and
// runs the pod under handler with crictl runp.
func (e *criEnv) runPod(t testing.TB, name, handler string, sharePID bool) *criPod {
	t.Helper()
	dir := filepath.Join(e.c.dir, "pods", name)
	pid := 1 // CONTAINER
	if sharePID {
		pid = 0 // POD
	}
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": name + "-uid"},
		"hostname":      name,
		"log_directory": dir,
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"pid": pid}}},
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &criPod{e: e, dir: dir, config: filepath.Join(dir, "pod.json")}
	writeJSON(t, p.config, cfg)
	out, err := e.crictl("runp", "--runtime", handler, p.config)
	if err != nil {
		t.Fatalf("crictl runp --runtime %s: %v", handler, err)
	}
	p.id = strings.TrimSpace(out)
	return p
}

// start creates and starts a container of criTestImage running args in the
// pod and returns its id.
func (p *criPod) start(t testing.TB, name string, args ...string) string {
	t.Helper()
	cfg := map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": criTestImage},
		"command":  args,
		"log_path": name + ".log",
		"linux":    map[string]any{},
	}
	path := filepath.Join(p.dir, name+".json")
	writeJSON(t, path, cfg)
	out, err := p.e.crictl("create", p.id, path, p.config)
	if err != nil {
		t.Fatalf("crictl create %s: %v", name, err)
	}
	id := strings.TrimSpace(out)
	if _, err := p.e.crictl("start", id); err != nil {
		t.Fatalf("crictl start %s: %v", name, err)
	}
	return id
}

// remove stops and removes the pod.
func (p *criPod) remove(t testing.TB) {
	t.Helper()
	for _, args := range [][]string{{"stopp", p.id}, {"rmp", p.id}} {
		if _, err := p.e.crictl(args...); err != nil {
			t.Fatalf("crictl %s: %v", args[0], err)
		}
	}
}

func writeJSON(t testing.TB, path string, v any) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, string(data))
}

// pullCRITestImage pulls criTestImage from the harness's registry.
func (e *criEnv) pullCRITestImage(t testing.TB) {
	t.Helper()
	if _, err := e.crictl("pull", criTestImage); err != nil {
		t.Fatalf("crictl pull %s: %v", criTestImage, err)
	}
}

// TestCRIPodFlowWithCrictl drives a pod through containerd's CRI under the
// boxlite handler as an operator would with crictl: runp, create, start,
// exec, logs, stop, rm, stopp, rmp. The pod's two containers run in one
// VM (one QEMU), share localhost (one serves, the other fetches), IPC, UTS
// and, with a pod-level pid namespace, see each other's processes;
// removing one container leaves the VM and the other; removing the pod
// leaves nothing (the harness's leak checks: processes, mounts, shim
// state, veths, CNI chains, namespaces).
func TestCRIPodFlowWithCrictl(t *testing.T) {
	e := startCRI(t)
	e.pullCRITestImage(t)
	pod := e.runPod(t, "bxflow", "boxlite", true)
	srv := pod.start(t, "server", "sh", "-c", "echo hello-from-the-server; echo page-from-the-pod > /tmp/index.html; exec httpd -f -p 8080 -h /tmp")
	cli := pod.start(t, "client", "sleep", "100000")
	if q := e.c.qemus(); len(q) != 1 {
		t.Errorf("%d QEMU processes for a pod of two containers; want 1: %v", len(q), q)
	}
	if err := poll.Wait(func() error {
		page, err := e.crictl("exec", cli, "wget", "-qO-", "http://127.0.0.1:8080/")
		if !strings.Contains(page, "page-from-the-pod") {
			return fmt.Errorf("%q, %v", page, err)
		}
		return nil
	}); err != nil {
		logs, _ := e.crictl("logs", srv)
		ps, _ := e.crictl("exec", srv, "ps")
		t.Fatalf("the server through the pod's localhost: %v\nserver log: %s\nserver ps: %s", err, logs, ps)
	}
	ns := func(id string) string {
		out, err := e.crictl("exec", id, "sh", "-c", "for n in net ipc uts pid mnt; do echo $n $(readlink /proc/self/ns/$n); done")
		if err != nil {
			t.Fatalf("crictl exec %s: %v", id, err)
		}
		return out
	}
	sn, cn := strings.Fields(ns(srv)), strings.Fields(ns(cli))
	for i := 0; i+1 < len(sn) && i+1 < len(cn); i += 2 {
		shared := sn[i] != "mnt"
		if (sn[i+1] == cn[i+1]) != shared {
			t.Errorf("%s namespace: server %s, client %s; want shared %v", sn[i], sn[i+1], cn[i+1], shared)
		}
	}
	if h, _ := e.crictl("exec", cli, "hostname"); strings.TrimSpace(h) != "bxflow" {
		t.Errorf("hostname in the pod: %q; want bxflow", h)
	}
	if ps, _ := e.crictl("exec", cli, "ps"); !strings.Contains(ps, "httpd") || !strings.Contains(ps, "pause") {
		t.Errorf("ps in a pod with a shared pid namespace:\n%s\nwant the server and the pause process", ps)
	}
	waitFor(t, time.Minute, "the server's log", func() bool {
		logs, _ := e.crictl("logs", srv)
		return strings.Contains(logs, "hello-from-the-server")
	})
	for _, args := range [][]string{{"stop", cli}, {"rm", cli}} {
		if _, err := e.crictl(args...); err != nil {
			t.Fatalf("crictl %s: %v", args[0], err)
		}
	}
	if q := e.c.qemus(); len(q) != 1 {
		t.Fatalf("%d QEMU processes after a container was removed; want the pod's 1", len(q))
	}
	if out, err := e.crictl("exec", srv, "cat", "/tmp/index.html"); err != nil || !strings.Contains(out, "page-from-the-pod") {
		t.Errorf("the server after its neighbour left: %q, %v", out, err)
	}
	pod.remove(t)
	waitFor(t, time.Minute, "the pod's VM to be gone", func() bool { return len(e.c.qemus()) == 0 })
}

// BenchmarkCRIPod measures through containerd's CRI, boxlite against runc
// in the same run and alternating (crictl wall times, medians and ratios):
// runp; runp plus create and start of one container; a second container in
// the running pod (no boot); and the VMM's RSS with one and with three app
// containers in the pod.
func BenchmarkCRIPod(b *testing.B) {
	e := startCRI(b)
	e.pullCRITestImage(b)
	times := map[string][]time.Duration{}
	var rss1, rss3 []float64
	for i := 0; i < b.N; i++ {
		for _, h := range []string{"boxlite", "runc"} {
			t0 := time.Now()
			pod := e.runPod(b, fmt.Sprintf("bench-%s-%d", h, i), h, false)
			t1 := time.Now()
			pod.start(b, "c0", "sleep", "100000")
			t2 := time.Now()
			pod.start(b, "c1", "sleep", "100000")
			t3 := time.Now()
			times[h+"-runp"] = append(times[h+"-runp"], t1.Sub(t0))
			times[h+"-runp+start"] = append(times[h+"-runp+start"], t2.Sub(t0))
			times[h+"-second"] = append(times[h+"-second"], t3.Sub(t2))
			if h == "boxlite" {
				q := e.c.qemus()
				if len(q) != 1 {
					b.Fatalf("%d QEMU processes for one pod", len(q))
				}
				rss := func() float64 { return float64(rssKiB(q[0].pid)) / 1024 }
				// One app container: c1 is removed again.
				if _, err := e.crictl("rm", "-f", pod.containerID(b, "c1")); err != nil {
					b.Fatal(err)
				}
				rss1 = append(rss1, rss())
				pod.start(b, "c2", "sleep", "100000")
				pod.start(b, "c3", "sleep", "100000")
				rss3 = append(rss3, rss())
			}
			pod.remove(b)
		}
	}
	for _, m := range []string{"runp", "runp+start", "second"} {
		bx, rc := median(times["boxlite-"+m]), median(times["runc-"+m])
		b.ReportMetric(ms(bx), "bx-"+m+"-ms")
		b.ReportMetric(ms(rc), "runc-"+m+"-ms")
		b.ReportMetric(float64(bx)/float64(rc), "bx/runc-"+m)
	}
	b.ReportMetric(medianF(rss1), "vmm-rss-1ctr-MiB")
	b.ReportMetric(medianF(rss3), "vmm-rss-3ctr-MiB")
}

// containerID returns the id of the pod's container name.
func (p *criPod) containerID(t testing.TB, name string) string {
	t.Helper()
	out, err := p.e.crictl("ps", "-a", "-q", "--pod", p.id, "--name", "^"+name+"$")
	if err != nil || strings.TrimSpace(out) == "" {
		t.Fatalf("crictl ps --name %s: %q, %v", name, out, err)
	}
	return strings.Fields(out)[0]
}
