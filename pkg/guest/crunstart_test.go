package guest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// fakeCreated makes <root>/<id>/exec.fifo as crun create leaves it: the
// init holds it open for reading, nonblocking. It returns the reader's fd
// (closed with the test), or -1 with reader false.
func fakeCreated(t *testing.T, root, id string, reader bool) int {
	t.Helper()
	dir := filepath.Join(root, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "exec.fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if !reader {
		return -1
	}
	fd, err := unix.Open(fifo, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestStartCrunContainerWakesTheInitAndMarksItRunning(t *testing.T) {
	root := t.TempDir()
	fd := fakeCreated(t, root, "c1", true)
	if err := startCrunContainer(root, "c1"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if n, err := unix.Read(fd, buf); err != nil || n != 1 {
		t.Errorf("the init read %d bytes (%v), want the one byte that starts it", n, err)
	}
	if _, err := os.Stat(filepath.Join(root, "c1", "exec.fifo")); !os.IsNotExist(err) {
		t.Errorf("exec.fifo still there (%v): crun would still say created", err)
	}
}

func TestStartCrunContainerRefusesWithoutAWaitingInit(t *testing.T) {
	root := t.TempDir()
	fakeCreated(t, root, "dead", false)
	err := startCrunContainer(root, "dead")
	if !errdefs.IsFailedPrecondition(err) {
		t.Errorf("start with no reader: %v, want FailedPrecondition", err)
	}
	if _, serr := os.Stat(filepath.Join(root, "dead", "exec.fifo")); serr != nil {
		t.Errorf("a failed start removed exec.fifo: %v", serr)
	}
	if err := startCrunContainer(root, "missing"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("start of a container never created: %v, want FailedPrecondition", err)
	}
}
