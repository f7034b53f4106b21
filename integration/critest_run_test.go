package integration

// Running critest: the skip list, the run itself, and its result read from
// ginkgo's JUnit report.

import (
	"bufio"
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// skipReasons are the only reasons a spec may be skipped for, the first
// word of an entry's reason: what a VM runtime cannot share with the host,
// what this host lacks, and an image that cannot be rebuilt offline.
var skipReasons = []string{
	"host-network:", // the VM has its own kernel: no host network
	"host-ipc:",     // ... no host IPC namespace
	"host-pid:",     // ... no host PID namespace
	"apparmor:",     // the host has no AppArmor
	"selinux:",      // the host has no SELinux
	"port-forward:", // containerd dials inside the pod's network namespace on the host, not in the VM
	"rshared:",      // rshared mount propagation between host and guest
	"digest-image:", // an upstream image pinned by digest, not rebuildable offline
}

// skipEntry is one line of a skip list: a spec's name (or a literal part
// of it), or a regular expression over spec names written /like this/, and
// why it is skipped.
type skipEntry struct {
	pattern, reason string
	// line is the entry's line number, for messages.
	line int
	// re matches the specs the entry skips.
	re *regexp.Regexp
}

// loadSkipList reads a skip list: one entry per line, `PATTERN # REASON`,
// REASON starting with one of skipReasons; blank lines and lines starting
// with # are comments.
func loadSkipList(path string) ([]skipEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var entries []skipEntry
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		pattern, reason, ok := strings.Cut(line, " # ")
		pattern, reason = strings.TrimSpace(pattern), strings.TrimSpace(reason)
		if !ok || pattern == "" || reason == "" {
			return nil, fmt.Errorf("%s:%d: want `PATTERN # REASON`: %q", path, n, line)
		}
		if !slices.ContainsFunc(skipReasons, func(r string) bool { return strings.HasPrefix(reason, r) }) {
			return nil, fmt.Errorf("%s:%d: reason %q is not one of the allowed %v", path, n, reason, skipReasons)
		}
		expr := regexp.QuoteMeta(pattern)
		if len(pattern) > 2 && strings.HasPrefix(pattern, "/") && strings.HasSuffix(pattern, "/") {
			expr = pattern[1 : len(pattern)-1]
		}
		re, err := regexp.Compile(expr)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, n, err)
		}
		entries = append(entries, skipEntry{pattern: pattern, reason: reason, line: n, re: re})
	}
	return entries, sc.Err()
}

// skipRegex is ginkgo's -ginkgo.skip for entries: any of them.
func skipRegex(entries []skipEntry) string {
	var alts []string
	for _, e := range entries {
		alts = append(alts, "(?:"+e.re.String()+")")
	}
	return strings.Join(alts, "|")
}

// critestRun is one run of the suite.
type critestRun struct {
	// handler is the CRI runtime handler the specs use.
	handler string
	// skips are the specs not to run.
	skips []skipEntry
	// parallel is critest's -parallel (ginkgo nodes).
	parallel int
	// timeout bounds the whole run.
	timeout time.Duration
}

// critestResult is what a run did, from its JUnit report.
type critestResult struct {
	// specs are the specs by outcome ("passed", "failed", "skipped",
	// "pending", ...), each with its failure message if any.
	specs map[string][]junitCase
	// summary are ginkgo's summary lines ("Ran N of M Specs ...").
	summary []string
	// exit is critest's exit status; elapsed its wall time.
	exit    int
	elapsed time.Duration
	// served is how many manifests and blobs the registry served.
	served int64
	// log is critest's output file.
	log string
}

// junitCase is one testcase of ginkgo's JUnit report.
type junitCase struct {
	Name    string `xml:"name,attr"`
	Status  string `xml:"status,attr"`
	Failure *struct {
		Message string `xml:"message,attr"`
	} `xml:"failure"`
	Skipped *struct {
		Message string `xml:"message,attr"`
	} `xml:"skipped"`
}

// runCritest runs critest against the daemon and reads its report. It
// fails the test if critest cannot run or its report is unreadable; the
// specs' outcomes are the caller's to judge.
func (e *criEnv) runCritest(t testing.TB, r critestRun) critestResult {
	t.Helper()
	report := filepath.Join(e.c.dir, "critest", "junit.xml")
	res := critestResult{log: filepath.Join(e.c.dir, "critest", "critest.log"), specs: map[string][]junitCase{}}
	args := []string{
		"-runtime-endpoint", "unix://" + e.c.addr, "-image-endpoint", "unix://" + e.c.addr,
		"-config", filepath.Join(e.c.dir, "crictl.yaml"), "-runtime-handler", r.handler, "-nri-socket", e.nriSocket(),
		"-ginkgo.no-color", "-ginkgo.junit-report", report, "-ginkgo.timeout", r.timeout.String(),
	}
	if r.parallel > 1 {
		// Only then: ginkgo refuses a run with -parallel set (to 1).
		args = append(args, "-parallel", strconv.Itoa(r.parallel))
	}
	if len(r.skips) > 0 {
		args = append(args, "-ginkgo.skip", skipRegex(r.skips))
	}
	if focus := os.Getenv("BOXLITE_CRITEST_FOCUS"); focus != "" {
		args = append(args, "-ginkgo.focus", focus)
	}
	t.Logf("critest %s", strings.Join(args, " "))
	began := time.Now()
	p := e.startCritest(t, res.log, args...)
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout+2*time.Minute)
	defer cancel()
	x, err := p.Wait(ctx)
	res.elapsed = time.Since(began)
	if err != nil {
		syscall.Kill(-p.Pid(), syscall.SIGKILL)
		x, _ = p.Wait(context.Background())
		t.Errorf("critest did not finish within %v (killed)", r.timeout+2*time.Minute)
	}
	res.exit, res.served = x.Status, e.reg.served.Load()
	if keep := os.Getenv("BOXLITE_CRITEST_LOG"); keep != "" {
		if data, err := os.ReadFile(res.log); err == nil {
			os.WriteFile(keep, data, 0o644)
		}
	}
	out, _ := os.ReadFile(res.log)
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Ran ") || strings.Contains(l, " Passed | ") || strings.HasPrefix(l, "Ginkgo ran ") {
			res.summary = append(res.summary, strings.TrimSpace(l))
		}
	}
	data, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("critest wrote no report (exit %d):\n%s", res.exit, tail(string(out), 60))
	}
	var suites struct {
		Cases []junitCase `xml:"testsuite>testcase"`
	}
	if err := xml.Unmarshal(data, &suites); err != nil {
		t.Fatalf("critest's report %s: %v", report, err)
	}
	for _, c := range suites.Cases {
		name, ok := strings.CutPrefix(c.Name, "[It] ")
		if !ok {
			// A suite node ([BeforeSuite], one per ginkgo process): only
			// its failure counts.
			if c.Status == "passed" || c.Status == "skipped" {
				continue
			}
			name = c.Name
		}
		c.Name = name
		res.specs[c.Status] = append(res.specs[c.Status], c)
	}
	return res
}

// check logs the run's summary and fails the test for every spec that
// failed, for a failed run without failed specs, and for a skip-list entry
// that matches no spec.
func (res critestResult) check(t testing.TB, r critestRun) {
	t.Helper()
	counts := fmt.Sprintf("%d passed, %d failed, %d skipped", len(res.specs["passed"]), len(res.specs["failed"]), len(res.specs["skipped"]))
	t.Logf("critest (%s, -parallel %d) in %v: %s (registry: %d manifests and blobs served)\n%s",
		r.handler, r.parallel, res.elapsed.Round(time.Second), counts, res.served, strings.Join(res.summary, "\n"))
	var skipped []string
	for _, c := range res.specs["skipped"] {
		msg := ""
		if c.Skipped != nil {
			msg = firstLine(c.Skipped.Message)
		}
		skipped = append(skipped, fmt.Sprintf("  %s (%s)", c.Name, msg))
	}
	slices.Sort(skipped)
	t.Logf("skipped:\n%s", strings.Join(skipped, "\n"))
	var failed []string
	for _, status := range []string{"failed", "panicked", "interrupted", "aborted", "timedout"} {
		for _, c := range res.specs[status] {
			msg := ""
			if c.Failure != nil {
				msg = firstLine(c.Failure.Message)
			}
			failed = append(failed, fmt.Sprintf("%s: %s\n    %s", status, c.Name, msg))
		}
	}
	if len(failed) > 0 {
		t.Errorf("%d critest spec(s) failed under %s:\n%s", len(failed), r.handler, strings.Join(failed, "\n"))
	}
	if res.exit != 0 && len(failed) == 0 {
		out, _ := os.ReadFile(res.log)
		t.Errorf("critest exited %d with no failed spec:\n%s", res.exit, tail(string(out), 60))
	}
	var all []string
	for _, cs := range res.specs {
		for _, c := range cs {
			all = append(all, c.Name)
		}
	}
	for _, e := range r.skips {
		if !slices.ContainsFunc(all, e.re.MatchString) {
			t.Errorf("skip-list entry on line %d matches no spec (stale?): %q", e.line, e.pattern)
		}
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
