package hooks

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/boxlite/boxlite/internal/leakcheck"
	"github.com/boxlite/boxlite/pkg/reaper"
)

// helperPrefix starts the argv[0] (its base name) of this test binary run
// as a hook: "boxlite-hook-<mode>". The mode travels in argv[0] rather than
// in the environment because hooks get exactly their Env, which the tests
// also set to nothing.
const helperPrefix = "boxlite-hook-"

// testBinary is the path of this test binary, which the tests run as hooks.
var testBinary string

func TestMain(m *testing.M) {
	if mode, ok := strings.CutPrefix(filepath.Base(os.Args[0]), helperPrefix); ok {
		// syscall.Exit skips the race runtime's one-second sleep at exit.
		syscall.Exit(helper(mode, os.Args[1:]))
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testBinary = exe
	reaper.Default()
	os.Exit(m.Run())
}

// record is what a hook in mode record saw.
type record struct {
	// Args is its argv.
	Args []string
	// Env is its environment.
	Env []string
	// Stdin is everything it read on stdin.
	Stdin []byte
}

// recordOutEnv names the file a record hook writes when it has no argument.
const recordOutEnv = "BOXLITE_HOOK_OUT"

// spewSize is how much a spew hook writes before its end marker.
const spewSize = 1 << 20

// spewEnd ends a spew hook's output.
const spewEnd = "END-OF-SPEW"

// helper is this test binary run as a hook. Modes and arguments:
//
//	record [OUT]               writes a record (JSON) of argv, env and stdin to OUT,
//	                           or to $BOXLITE_HOOK_OUT; exits 0
//	fail STATUS STDERR STDOUT  writes STDOUT and STDERR and exits STATUS
//	selfkill                   kills itself with SIGKILL
//	noread                     exits 0 at once, never reading stdin
//	spew STREAM                writes 1 MiB and then END-OF-SPEW to STREAM
//	                           (stdout or stderr) and exits 1
//	hang [PIDFILE [tree]]      writes "PID CHILDPID" (tree: a child that hangs
//	                           too, in its group) or "PID" to PIDFILE; hangs
//	daemon PIDFILE             starts a child that hangs in a new session holding
//	                           our stdout and stderr, writes its pid; exits 0
func helper(mode string, args []string) int {
	arg := func(i int) string {
		if i < len(args) {
			return args[i]
		}
		return ""
	}
	switch mode {
	case "record":
		out := cmp.Or(arg(0), os.Getenv(recordOutEnv))
		stdin, err := io.ReadAll(os.Stdin)
		if err != nil {
			return fail(err)
		}
		data, err := json.Marshal(record{Args: os.Args, Env: os.Environ(), Stdin: stdin})
		if err != nil {
			return fail(err)
		}
		if err := os.WriteFile(out, data, 0o644); err != nil {
			return fail(err)
		}
		return 0
	case "fail":
		status, _ := strconv.Atoi(arg(0))
		fmt.Fprint(os.Stderr, arg(1))
		fmt.Fprint(os.Stdout, arg(2))
		return status
	case "selfkill":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		hang()
	case "noread":
		return 0
	case "spew":
		w := os.Stderr
		if arg(0) == "stdout" {
			w = os.Stdout
		}
		line := strings.Repeat("x", 1023) + "\n"
		for n := 0; n < spewSize; n += len(line) {
			io.WriteString(w, line)
		}
		io.WriteString(w, spewEnd+"\n")
		return 1
	case "hang":
		if arg(0) == "" {
			hang()
		}
		pids := strconv.Itoa(os.Getpid())
		if arg(1) == "tree" {
			child, err := startHelper("hang", nil)
			if err != nil {
				return fail(err)
			}
			pids += " " + strconv.Itoa(child)
		}
		if err := writeAtomic(arg(0), pids); err != nil {
			return fail(err)
		}
		hang()
	case "daemon":
		child, err := startHelper("hang", &syscall.SysProcAttr{Setsid: true})
		if err != nil {
			return fail(err)
		}
		if err := writeAtomic(arg(0), strconv.Itoa(child)); err != nil {
			return fail(err)
		}
		return 0
	}
	return fail(fmt.Errorf("unknown helper mode %q", mode))
}

// startHelper starts this binary in mode with our stdio and returns its
// pid. Only helper processes call it; nobody waits for the child, which
// the test process reaps once it is reparented.
func startHelper(mode string, attr *syscall.SysProcAttr) (int, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := &exec.Cmd{
		Path: exe, Args: []string{helperPrefix + mode}, Env: os.Environ(),
		Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, SysProcAttr: attr,
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	return cmd.Process.Pid, nil
}

func writeAtomic(path, content string) error {
	if err := os.WriteFile(path+".tmp", []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}

func hang() {
	for {
		time.Sleep(time.Hour)
	}
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "helper:", err)
	return 99
}

// checkLeaks fails the test if it leaves goroutines, descriptors or child
// processes (zombies included) behind. Call it before anything the test
// starts.
func checkLeaks(t *testing.T) {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
	leakcheck.Children(t)
}

// helperHook returns a hook that runs this test binary in mode with args
// and an empty environment.
func helperHook(mode string, args ...string) specs.Hook {
	return specs.Hook{Path: testBinary, Args: append([]string{helperPrefix + mode}, args...)}
}

// testState returns a container state with every field set.
func testState() *specs.State {
	return &specs.State{
		Version:     specs.Version,
		ID:          "box-1",
		Status:      specs.StateCreating,
		Pid:         4242,
		Bundle:      "/run/boxlite/box-1",
		Annotations: map[string]string{"io.boxlite.test": "yes", "quoted": "\"a\"\n"},
	}
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func intp(n int) *int { return &n }

// hookName is how errors name hook i of kind when it runs this test binary.
func hookName(kind string, i int) string {
	return fmt.Sprintf("%s hook #%d %q", kind, i, testBinary)
}

func readRecord(t *testing.T, path string) record {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("hook did not run: %v", err)
	}
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

func assertNotRan(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("hook writing %s ran (stat: %v)", filepath.Base(path), err)
	}
}

// assertError fails unless err is of class is and says exactly want.
func assertError(t *testing.T, err error, is func(error) bool, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %q", want)
	}
	if got := err.Error(); got != want {
		t.Errorf("error\n got %q\nwant %q", got, want)
	}
	if !is(err) {
		t.Errorf("error %q (%T) is not of the expected class", err, err)
	}
}

// waitPids polls, with a deadline, for the pid file a hang or daemon hook
// writes, and returns its pids.
func waitPids(t *testing.T, path string) []int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, err := os.ReadFile(path)
		if err == nil {
			var pids []int
			for _, f := range strings.Fields(string(data)) {
				pid, err := strconv.Atoi(f)
				if err != nil {
					t.Fatalf("pid file %q: %v", data, err)
				}
				pids = append(pids, pid)
			}
			return pids
		}
		if time.Now().After(deadline) {
			t.Fatalf("hook never wrote %s: %v", path, err)
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}

// procStatus returns the Name, State and PPid lines of pid, or "" once pid
// has left /proc.
func procStatus(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "Name:") || strings.HasPrefix(l, "State:") || strings.HasPrefix(l, "PPid:") {
			out = append(out, l)
		}
	}
	return strings.Join(out, ", ")
}

// assertGone fails unless pid has left /proc: not running, not a zombie.
func assertGone(t *testing.T, pid int) {
	t.Helper()
	if st := procStatus(pid); st != "" {
		t.Errorf("pid %d still present: %s", pid, st)
	}
}

// waitGone polls, with a deadline, until pid has left /proc.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := procStatus(pid)
		if st == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("pid %d never reaped: %s", pid, st)
			return
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}
