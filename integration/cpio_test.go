package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// fakeInitrd builds an initramfs whose /init is a busybox shell script (with
// /dev, /sys and /proc mounted first), for guests that misbehave on purpose.
func fakeInitrd(t testing.TB, script string) string {
	t.Helper()
	return rawInitrd(t, "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n"+
		"mount -t devtmpfs dev /dev; mount -t sysfs sys /sys; mount -t proc proc /proc\n"+script)
}

// rawInitrd builds an initramfs with busybox and init as /init.
func rawInitrd(t testing.TB, init string) string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	w := &newcWriter{buf: &buf}
	w.dir("bin")
	w.dir("dev")
	w.dir("sys")
	w.dir("proc")
	w.file("bin/busybox", 0o755, bb)
	w.file("init", 0o755, []byte(init))
	w.trailer()
	path := filepath.Join(shortTempDir(t), "initrd.cpio")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// newcWriter writes the "newc" cpio format the kernel unpacks as initramfs.
type newcWriter struct {
	buf *bytes.Buffer
	ino int
}

func (w *newcWriter) entry(name string, mode uint32, data []byte) {
	w.ino++
	fmt.Fprintf(w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *newcWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *newcWriter) dir(name string)                         { w.entry(name, 0o040755, nil) }
func (w *newcWriter) file(name string, perm uint32, d []byte) { w.entry(name, 0o100000|perm, d) }
func (w *newcWriter) trailer()                                { w.entry("TRAILER!!!", 0, nil) }

// charDev writes a character device node (the kernel gives init
// /dev/console as its stdio only if the initramfs has it).
func (w *newcWriter) charDev(name string, perm uint32, major, minor int) {
	w.ino++
	fmt.Fprintf(w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, 0o020000|perm, 0, 0, 1, 0, 0, 0, 0, major, minor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
}
