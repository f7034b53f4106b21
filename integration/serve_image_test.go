package integration

// Images through the daemon: boxes made from images pulled from a registry
// on 127.0.0.1 (docker-registry, internal/registrytest) or loaded from a
// tarball, over the REST client and the CLI with --url.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxlite/boxlite/internal/registrytest"
	"github.com/boxlite/boxlite/pkg/api"
)

// imageTestTimeout bounds one image test's calls to the daemon (several
// VMs boot one after the other under TCG).
const imageTestTimeout = 10 * time.Minute

// Repositories the tests push to their registry.
const (
	busyboxRepo = "boxlite/busybox:test"
	noCmdRepo   = "boxlite/nocmd:test"
	// configRepo is busybox with a config of its own (configImageConfig).
	configRepo = "boxlite/config:test"
)

// configImageConfig is the config of configRepo: every field a box takes
// from its image differs from docker's defaults.
var configImageConfig = ocispec.ImageConfig{
	Env:        []string{"PATH=/bin:/usr/bin", "GREETING=from the image"},
	Cmd:        []string{"sh"},
	WorkingDir: "/home/user",
	User:       "user",
}

// imageRegistry is a test's registry, filled from the busybox OCI tarball
// of scripts/oci-image.sh.
type imageRegistry struct {
	reg *registrytest.Registry
	// tarball is the OCI tarball's path.
	tarball string
	// busybox, noCmd and config are the names to pull the pushed images
	// by: 127.0.0.1:PORT/boxlite/...
	busybox, noCmd, config string
	// busyboxDigest is the manifest digest of busybox.
	busyboxDigest digest.Digest
	// busyboxConfig is busybox's image config.
	busyboxConfig ocispec.ImageConfig
}

// startImageRegistry starts a registry and pushes testImage, noCmdImage and
// a derived image with configImageConfig (the same layer) to it.
func startImageRegistry(t *testing.T) *imageRegistry {
	t.Helper()
	tarball, err := imageTarball()
	if err != nil {
		t.Fatalf("%v: run make setup (busybox-static)", err)
	}
	reg := registrytest.Start(t)
	layout := registrytest.ReadLayout(t, tarball)
	r := &imageRegistry{reg: reg, tarball: tarball}
	bb := layout.Image(t, testImage)
	r.busyboxDigest = reg.Push(t, bb, layout.Blobs, busyboxRepo)
	reg.Push(t, layout.Image(t, noCmdImage), layout.Blobs, noCmdRepo)
	var manifest ocispec.Manifest
	var config ocispec.Image
	imgJSON(t, layout.Blobs[bb.Digest], &manifest)
	imgJSON(t, layout.Blobs[manifest.Config.Digest], &config)
	r.busyboxConfig = config.Config

	// The derived image: busybox's manifest with a config of its own.
	blobs := registrytest.Blobs{}
	for d, b := range layout.Blobs {
		blobs[d] = b
	}
	add := func(mediaType string, v any) ocispec.Descriptor {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
		blobs[d.Digest] = b
		return d
	}
	config.Config = configImageConfig
	manifest.Config = add(ocispec.MediaTypeImageConfig, config)
	reg.Push(t, add(ocispec.MediaTypeImageManifest, manifest), blobs, configRepo)

	r.busybox, r.noCmd, r.config = reg.Host()+"/"+busyboxRepo, reg.Host()+"/"+noCmdRepo, reg.Host()+"/"+configRepo
	return r
}

func imgJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("image tarball: %v", err)
	}
}

// envValue returns the value of key in env (K=V pairs).
func envValue(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// overlayMount is an overlay mount of /proc/self/mountinfo.
type overlayMount struct {
	// point is where it is mounted.
	point string
	// lower are its lower directories, upper its upper directory.
	lower []string
	upper string
}

// overlaysUnder returns the overlay mounts at or below dir.
func overlaysUnder(t testing.TB, dir string) []overlayMount {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []overlayMount
	for line := range strings.Lines(string(data)) {
		before, after, _ := strings.Cut(strings.TrimSpace(line), " - ")
		fields, tail := strings.Fields(before), strings.Fields(after)
		if len(fields) < 5 || len(tail) < 3 || tail[0] != "overlay" {
			continue
		}
		if p := fields[4]; p != dir && !strings.HasPrefix(p, dir+"/") {
			continue
		}
		m := overlayMount{point: fields[4]}
		for _, opt := range strings.Split(tail[2], ",") {
			if v, ok := strings.CutPrefix(opt, "lowerdir="); ok {
				m.lower = strings.Split(v, ":")
			}
			if v, ok := strings.CutPrefix(opt, "upperdir="); ok {
				m.upper = v
			}
		}
		out = append(out, m)
	}
	return out
}

// noOverlayLeft registers a check, to run after the daemon's cleanup (call
// it before serve), that no overlay mount is left under dir.
func noOverlayLeft(t *testing.T, dir string) {
	t.Cleanup(func() {
		if left := overlaysUnder(t, dir); len(left) > 0 {
			t.Errorf("leak: overlay mounts left under %s: %+v", dir, left)
		}
	})
}

// dirNames lists the names in dir (none if it does not exist).
func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// runImageBox starts created box id, relays its output until it exits and
// returns its stdout; it fails the test unless the box exits 0 and its logs
// say the same.
func runImageBox(ctx context.Context, t *testing.T, d *daemon, id string) string {
	t.Helper()
	if err := d.c.Start(ctx, id); err != nil {
		t.Fatalf("start box %s: %v", id, err)
	}
	var out, errOut bytes.Buffer
	e, err := d.c.Attach(ctx, id, api.Stdio{Stdout: &out, Stderr: &errOut})
	if err != nil || e.Status != 0 {
		t.Fatalf("box %s: exit %d (%v), stdout %q, stderr %q", id, e.Status, err, out.String(), errOut.String())
	}
	if err := within(time.Minute, func() error {
		var logs bytes.Buffer
		if err := d.c.Logs(ctx, id, api.LogsOptions{}, &logs, &logs); err != nil {
			return err
		}
		if logs.String() != out.String() {
			return fmt.Errorf("logs %q", logs.String())
		}
		return nil
	}); err != nil {
		t.Errorf("box %s: attach relayed %q, but %v", id, out.String(), err)
	}
	return out.String()
}

// TestServeImagePullRunAndShare: through the daemon, an image pulled from a
// registry runs in two boxes with its config applied (PATH from its Env,
// its working directory and user); both boxes' overlays stack the same
// unpacked layer directories, and what one box writes the other does not
// see. The image cannot be removed while boxes use it (a conflict naming
// them); once they are gone it can, and its layers are collected.
func TestServeImagePullRunAndShare(t *testing.T) {
	m := newMgr(t)
	noOverlayLeft(t, m.state)
	r := startImageRegistry(t)
	d := m.serve(nil)
	ctx, cancel := context.WithTimeout(context.Background(), imageTestTimeout)
	defer cancel()

	img, err := d.c.PullImage(ctx, r.busybox)
	if err != nil {
		t.Fatalf("pull %s: %v", r.busybox, err)
	}
	if img.Name != r.busybox || img.Digest != r.busyboxDigest.String() || img.Layers != 1 || !slices.Equal(img.Config.Cmd, []string{"sh"}) {
		t.Errorf("pulled %+v; want %s, digest %s, 1 layer, cmd [sh]", img, r.busybox, r.busyboxDigest)
	}
	if list, err := d.c.ListImages(ctx); err != nil || len(list) != 1 || list[0].Name != r.busybox {
		t.Errorf("images after the pull: %+v (%v), want only %s", list, err, r.busybox)
	}

	// Each box tells what its config is, whether it sees a /tmp/f, and
	// writes its own.
	script := `echo "$PATH"; pwd; id -u; cat /tmp/f 2>/dev/null || echo no-f; echo "$NAME" > /tmp/f; cat /tmp/f`
	var ids []string
	for _, name := range []string{"a", "b"} {
		id, err := d.c.Create(ctx, api.CreateRequest{Image: r.busybox, Cmd: []string{"sh", "-c", script}, Env: []string{"NAME=" + name}})
		if err != nil {
			t.Fatalf("create a box from %s: %v", r.busybox, err)
		}
		ids = append(ids, id)
		b, err := d.c.Inspect(ctx, id)
		if want := filepath.Join(m.state, "boxes", id, "rootfs"); err != nil || b.Image != r.busybox || b.Rootfs != want {
			t.Errorf("inspect box %s: image %q, rootfs %q (%v); want %s, %s", id, b.Image, b.Rootfs, err, r.busybox, want)
		}
	}
	overlays := assertSharedLayers(t, m.state, ids)

	// The image's config, or docker's defaults where it sets nothing. (Its
	// PATH is docker's default one: TestServeImageCLI runs an image whose
	// Env, WorkingDir and User all differ from the defaults.)
	path, cwd, user := envValue(r.busyboxConfig.Env, "PATH"), cmp.Or(r.busyboxConfig.WorkingDir, "/"), "0"
	if path == "" || r.busyboxConfig.User != "" {
		t.Fatalf("the busybox image's config %+v: want a PATH and no user", r.busyboxConfig)
	}
	for i, id := range ids {
		name := []string{"a", "b"}[i]
		// b runs after a wrote its /tmp/f: it must not see it.
		want := fmt.Sprintf("%s\n%s\n%s\nno-f\n%s\n", path, cwd, user, name)
		out := runImageBox(ctx, t, d, id)
		if out != want {
			t.Errorf("box %s (%s) printed %q, want %q", name, id, out, want)
		}
		t.Logf("box %s printed %q", name, out)
		if f, err := os.ReadFile(filepath.Join(overlays[i].upper, "tmp", "f")); err != nil || string(f) != name+"\n" {
			t.Errorf("box %s's upper directory: tmp/f %q (%v), want %q", name, f, err, name+"\n")
		}
	}
	for _, l := range overlays[0].lower {
		if _, err := os.Stat(filepath.Join(l, "tmp", "f")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a box wrote into the shared layer %s: tmp/f: %v", l, err)
		}
	}

	err = d.c.RemoveImage(ctx, r.busybox)
	t.Logf("remove the image while boxes use it: %v", err)
	if !isCode(err, api.CodeConflict) || !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), ids[0]) || !strings.Contains(err.Error(), ids[1]) {
		t.Errorf("remove the image while boxes %v use it: %v; want a conflict naming both", ids, err)
	}
	if list, err := d.c.ListImages(ctx); err != nil || len(list) != 1 {
		t.Errorf("images after a refused remove: %+v (%v), want %s still", list, err, r.busybox)
	}
	for _, id := range ids {
		if err := d.c.Remove(ctx, id, false); err != nil {
			t.Fatalf("remove box %s: %v", id, err)
		}
	}
	if left := overlaysUnder(t, m.state); len(left) > 0 {
		t.Errorf("overlays left once the boxes are removed: %+v", left)
	}
	if left := dirNames(t, filepath.Join(m.state, "boxes")); len(left) > 0 {
		t.Errorf("box directories left once the boxes are removed: %v", left)
	}
	if err := d.c.RemoveImage(ctx, r.busybox); err != nil {
		t.Fatalf("remove the image no box uses: %v", err)
	}
	assertImagesCollected(ctx, t, d, m.state)
}

// assertSharedLayers checks the overlays of boxes ids (created from one
// image): each box's rootfs is an overlay whose lower directories are the
// same unpacked layers under <state>/images/layers, and whose upper
// directory is the box's own. It returns them in the order of ids.
func assertSharedLayers(t *testing.T, state string, ids []string) []overlayMount {
	t.Helper()
	layers := filepath.Join(state, "images", "layers")
	var out []overlayMount
	for _, id := range ids {
		rootfs := filepath.Join(state, "boxes", id, "rootfs")
		var found []overlayMount
		for _, o := range overlaysUnder(t, rootfs) {
			if o.point == rootfs {
				found = append(found, o)
			}
		}
		if len(found) != 1 {
			t.Fatalf("box %s: %d overlay mounts at %s, want 1: %+v", id, len(found), rootfs, overlaysUnder(t, state))
		}
		o := found[0]
		if len(o.lower) == 0 || o.upper == "" || !strings.HasPrefix(o.upper, filepath.Join(state, "boxes", id)+"/") {
			t.Errorf("box %s: overlay %+v; want lower directories and an upper directory in the box's directory", id, o)
		}
		for _, l := range o.lower {
			if filepath.Dir(l) != layers {
				t.Errorf("box %s: lower directory %s is not a layer under %s", id, l, layers)
			}
		}
		out = append(out, o)
	}
	if !slices.Equal(out[0].lower, out[1].lower) {
		t.Errorf("the boxes do not share their layers: lowerdir %v and %v", out[0].lower, out[1].lower)
	}
	if out[0].upper == out[1].upper {
		t.Errorf("the boxes share their upper directory %s", out[0].upper)
	}
	t.Logf("boxes %v: overlays with lowerdir %v, upperdirs %s and %s", ids, out[0].lower, out[0].upper, out[1].upper)
	if got := dirNames(t, layers); len(got) != len(out[0].lower) {
		t.Errorf("layers unpacked: %v; want one directory per layer of the image (%v)", got, out[0].lower)
	}
	return out
}

// assertImagesCollected fails unless the daemon lists no image and the
// store under state holds no unpacked layer, blob or ingest.
func assertImagesCollected(ctx context.Context, t *testing.T, d *daemon, state string) {
	t.Helper()
	if list, err := d.c.ListImages(ctx); err != nil || len(list) != 0 {
		t.Errorf("images after remove: %+v (%v), want none", list, err)
	}
	root := filepath.Join(state, "images")
	for _, dir := range []string{"layers", "content/blobs/sha256", "content/ingest"} {
		if left := dirNames(t, filepath.Join(root, dir)); len(left) > 0 {
			t.Errorf("left in the image store's %s after the image was removed: %v", dir, left)
		}
	}
}

// oneLine says s (stderr) is one line of text.
func oneLine(s string) bool {
	s = strings.TrimSuffix(s, "\n")
	return s != "" && !strings.Contains(s, "\n")
}

// TestServeImageCLI: the CLI through the daemon (--url) pulls, lists, runs
// and removes images: run takes the image's command when given none and
// refuses an image without one, run pulls a missing image, and a tarball
// loads through the daemon and locally alike. A bad reference or an
// unreachable registry is exit 1 with a one-line message, and leaves no box
// and no half-fetched content.
func TestServeImageCLI(t *testing.T) {
	m := newMgr(t)
	noOverlayLeft(t, m.state)
	r := startImageRegistry(t)
	d := m.serve(nil)
	cli := func(args ...string) mgrResult {
		t.Helper()
		return m.run(nil, append([]string{"--url", d.url}, args...)...)
	}
	expect := func(want mgrResult, args ...string) {
		t.Helper()
		if got := cli(args...); got.code != want.code || got.stdout != want.stdout {
			t.Errorf("boxlite --url %v: %v; want exit %d, stdout %q", args, got, want.code, want.stdout)
		}
	}

	expect(mgrResult{stdout: r.busybox + "\n"}, "image", "pull", r.busybox)
	if res := cli("image", "ls"); res.code != 0 || !strings.Contains(res.stdout, "\n"+r.busybox+" ") {
		t.Errorf("image ls: %v; want a row of %s", res, r.busybox)
	}
	expect(mgrResult{stdout: r.busybox + "\n"}, "image", "ls", "-q")
	expect(mgrResult{stdout: "hi\n"}, "run", "--rm", r.busybox, "echo", "hi")
	// The image's command, sh, reads no stdin and exits 0.
	expect(mgrResult{}, "run", "--rm", r.busybox)
	// run pulls a missing image; its config is applied.
	expect(mgrResult{stdout: "/bin:/usr/bin\nfrom the image\n/home/user\n1000\n"},
		"run", "--rm", r.config, "sh", "-c", `echo "$PATH"; echo "$GREETING"; pwd; id -u`)
	res := cli("run", "--rm", r.noCmd)
	t.Logf("run an image without a command: %v", res)
	if res.code != 1 || !oneLine(res.stderr) || !strings.Contains(res.stderr, "has no command") {
		t.Errorf("run an image without a command and none given: %v; want exit 1 saying it has no command", res)
	}
	assertNoBoxLeft(t, m, cli, "run of an image without a command")
	expect(mgrResult{stdout: strings.Join([]string{r.busybox, r.config, r.noCmd}, "\n") + "\n"}, "image", "ls", "-q")
	expect(mgrResult{stdout: r.busybox + "\n" + r.config + "\n" + r.noCmd + "\n"}, "image", "rm", r.busybox, r.config, r.noCmd)
	expect(mgrResult{}, "image", "ls", "-q")

	// A tarball loads through the daemon (uploaded) and locally.
	loaded := testImage + "\n" + noCmdImage + "\n"
	expect(mgrResult{stdout: loaded}, "image", "load", r.tarball)
	expect(mgrResult{stdout: loaded}, "image", "rm", testImage, noCmdImage)
	if res := m.run(nil, "image", "load", r.tarball); res.code != 0 || res.stdout != loaded {
		t.Errorf("image load locally: %v; want %q", res, loaded)
	}
	expect(mgrResult{stdout: loaded}, "image", "ls", "-q")
	// docker.io is not reachable: the box runs the loaded image.
	expect(mgrResult{stdout: "loaded\n"}, "run", "--rm", testImage, "echo", "loaded")
	expect(mgrResult{stdout: loaded}, "image", "rm", testImage, noCmdImage)

	// A repository must be lowercase. (UPPER/case is no bad reference: an
	// upper-case first component is a registry host, as docker reads it.)
	const badRef = "case/UPPER"
	closed := registrytest.ClosedHost(t) + "/x:y"
	for _, tt := range []struct {
		name string
		args []string
		// says must be in the message.
		says string
	}{
		{"pull a bad reference", []string{"image", "pull", badRef}, "invalid image reference"},
		{"run a bad reference", []string{"run", "--rm", badRef, "true"}, "invalid image reference"},
		{"pull from an unreachable registry", []string{"image", "pull", closed}, "unreachable"},
		{"run from an unreachable registry", []string{"run", "--rm", closed, "true"}, "unreachable"},
	} {
		res := cli(tt.args...)
		t.Logf("%s: %v", tt.name, res)
		if res.code != 1 || res.stdout != "" || !oneLine(res.stderr) || !strings.Contains(res.stderr, tt.says) {
			t.Errorf("%s (boxlite --url %v): %v; want exit 1 with one line saying %q", tt.name, tt.args, res, tt.says)
		}
		assertNoBoxLeft(t, m, cli, tt.name)
	}
	expect(mgrResult{}, "image", "ls", "-q")
	assertImagesCollected(context.Background(), t, d, m.state)
}

// assertNoBoxLeft fails the test if, after what, the daemon lists a box or
// a box directory, overlay mount or half-fetched content (an ingest) is
// left in the state directory.
func assertNoBoxLeft(t *testing.T, m *mgr, cli func(...string) mgrResult, what string) {
	t.Helper()
	if res := cli("ps", "-q"); res.code != 0 || res.stdout != "" {
		t.Errorf("after %s: ps -q: %v; want no box", what, res)
	}
	if left := dirNames(t, filepath.Join(m.state, "boxes")); len(left) > 0 {
		t.Errorf("after %s: box directories left: %v", what, left)
	}
	if left := overlaysUnder(t, m.state); len(left) > 0 {
		t.Errorf("after %s: overlay mounts left: %+v", what, left)
	}
	if left := dirNames(t, filepath.Join(m.state, "images", "content", "ingest")); len(left) > 0 {
		t.Errorf("after %s: half-fetched content left in the image store's ingest: %v", what, left)
	}
}
