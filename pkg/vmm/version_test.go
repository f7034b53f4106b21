package vmm

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestQEMUVersionReturnsTheFirstLine(t *testing.T) {
	checkLeaks(t)
	t.Setenv(fakeQEMUEnv, "version")
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	got, err := QEMUVersion(testCtx(t, 10*time.Second), os.Args[0])
	if err != nil || got != "QEMU emulator version 7.2.99 (fake)" {
		t.Errorf("QEMUVersion() = %q, %v", got, err)
	}
}

func TestQEMUVersionReportsAFailingBinary(t *testing.T) {
	checkLeaks(t)
	t.Setenv(fakeQEMUEnv, "exit")
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	_, err := QEMUVersion(testCtx(t, 10*time.Second), os.Args[0])
	if err == nil || !strings.Contains(err.Error(), "exited with status 1") {
		t.Errorf("QEMUVersion() error = %v, want the exit status", err)
	}
}

func TestQEMUVersionIsBoundedByItsContext(t *testing.T) {
	checkLeaks(t)
	t.Setenv(fakeQEMUEnv, "hang")
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	_, err := QEMUVersion(testCtx(t, 200*time.Millisecond), os.Args[0])
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("QEMUVersion() of a binary that never exits = %v, want deadline exceeded", err)
	}
}

// CheckSandbox passes with this machine's QEMU (Debian's has seccomp) and
// fails, quoting it, with a binary that cannot apply the filter.
func TestCheckSandbox(t *testing.T) {
	checkLeaks(t)
	qemu, err := exec.LookPath(QEMUBinaryName)
	if err != nil {
		t.Skipf("%s not installed: run make setup", QEMUBinaryName)
	}
	if err := CheckSandbox(testCtx(t, 30*time.Second), qemu); err != nil {
		t.Errorf("CheckSandbox(%s) = %v", qemu, err)
	}
	t.Setenv(fakeQEMUEnv, "exit")
	t.Setenv("GORACE", "atexit_sleep_ms=0")
	if err := CheckSandbox(testCtx(t, 10*time.Second), os.Args[0]); err == nil || !strings.Contains(err.Error(), "-sandbox") {
		t.Errorf("CheckSandbox(a failing binary) = %v, want an error naming -sandbox", err)
	}
}
