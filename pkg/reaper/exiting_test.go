package reaper

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// Exiting tells a live process from one that is gone or going, which is how
// a failed exec is told from an exec that raced its container's death.
func TestExitingTellsALiveProcessFromAGoneOne(t *testing.T) {
	if Exiting(os.Getpid()) {
		t.Fatal("the test process reads as dying")
	}
	cmd := exec.Command("sleep", "100")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	if Exiting(pid) {
		t.Fatal("a sleeping child reads as dying")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Not reaped yet: a zombie, then gone once waited for.
	deadline := time.Now().Add(30 * time.Second)
	for !Exiting(pid) {
		if time.Now().After(deadline) {
			t.Fatal("a SIGKILLed child never read as dying")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Wait()
	if !Exiting(pid) {
		t.Fatal("a reaped child does not read as dying")
	}
}
