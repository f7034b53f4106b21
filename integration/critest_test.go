package integration

// cri-tools' CRI validation suite (critest) against containerd's CRI
// plugin, with runc as the reference and then with boxlite. See
// critest_harness_test.go for the environment and its leak checks.

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// critestParallel is critest's default -parallel here: ginkgo nodes
// running specs side by side (serial specs run alone at the end).
// BOXLITE_CRITEST_PARALLEL overrides it.
const critestParallel = 4

// critestSettings returns the parallelism and the skip list at path.
func critestSettings(t *testing.T, skipList string) (int, []skipEntry) {
	t.Helper()
	parallel := critestParallel
	if v := os.Getenv("BOXLITE_CRITEST_PARALLEL"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("BOXLITE_CRITEST_PARALLEL=%q: want a positive number", v)
		}
		parallel = n
	}
	skips, err := loadSkipList(filepath.Join(repoRoot, "integration", "testdata", skipList))
	if err != nil {
		t.Fatal(err)
	}
	return parallel, skips
}

// TestCritestRunc runs the suite with the runc handler: the reference the
// boxlite run is held to. Only the digest-pinned image spec is skipped.
func TestCritestRunc(t *testing.T) {
	parallel, skips := critestSettings(t, "critest-runc-skip.txt")
	e := startCRI(t)
	r := critestRun{handler: "runc", skips: skips, parallel: parallel, timeout: 20 * time.Minute}
	e.runCritest(t, r).check(t, r)
}

// TestCritestBoxlite runs the suite with the boxlite handler, skipping
// what integration/testdata/critest-boxlite-skip.txt lists (only what a VM
// cannot share with the host, what this host lacks, and the digest image).
func TestCritestBoxlite(t *testing.T) {
	parallel, skips := critestSettings(t, "critest-boxlite-skip.txt")
	e := startCRI(t)
	r := critestRun{handler: "boxlite", skips: skips, parallel: parallel, timeout: 90 * time.Minute}
	e.runCritest(t, r).check(t, r)
}

// TestCritestSkipListsAreWellFormed checks the skip lists' format and
// reasons without running critest, and that the parser refuses what it
// must.
func TestCritestSkipListsAreWellFormed(t *testing.T) {
	for _, f := range []string{"critest-runc-skip.txt", "critest-boxlite-skip.txt"} {
		if _, err := loadSkipList(filepath.Join(repoRoot, "integration", "testdata", f)); err != nil {
			t.Error(err)
		}
	}
	for _, tc := range []struct {
		name, line string
		ok         bool
		matches    string
	}{
		{"literal with brackets", "should support portforward [Conformance] # port-forward: x", true, "[k8s.io] Streaming should support portforward [Conformance]"},
		{"regex", "/HostIpc is (true|false)/ # host-ipc: x", true, "[k8s.io] Security Context runtime should support HostIpc is false"},
		{"reason not allowed", "runtime should support RunAsUser # too slow", false, ""},
		{"no reason", "runtime should support RunAsUser", false, ""},
		{"bad regex", "/(/ # host-pid: x", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "skip.txt")
			writeFile(t, p, "# comment\n\n"+tc.line+"\n")
			entries, err := loadSkipList(p)
			if (err == nil) != tc.ok {
				t.Fatalf("loadSkipList(%q) = %v, want ok %v", tc.line, err, tc.ok)
			}
			if tc.ok && (len(entries) != 1 || !entries[0].re.MatchString(tc.matches)) {
				t.Errorf("entries %+v do not match %q", entries, tc.matches)
			}
		})
	}
	// A literal entry with brackets must not turn into a character class.
	p := filepath.Join(t.TempDir(), "skip.txt")
	writeFile(t, p, "portforward [Conformance] # port-forward: x\n")
	entries, err := loadSkipList(p)
	if err != nil {
		t.Fatal(err)
	}
	if entries[0].re.MatchString("portforward C") {
		t.Errorf("literal entry %q matched as a regular expression", entries[0].pattern)
	}
}
