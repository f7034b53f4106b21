package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// checkFixture creates a fake QEMU, kernel and initramfs and returns the
// check flags naming them.
func checkFixture(t *testing.T) (dir string, flags []string) {
	t.Helper()
	dir = t.TempDir()
	qemu := filepath.Join(dir, "qemu-system-x86_64")
	script := "#!/bin/sh\necho 'QEMU emulator version 7.2.99 (fake)'\necho 'Copyright'\n"
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"vmlinux", "initramfs.cpio"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 3<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir, []string{"check", "--qemu", qemu, "--accel", "tcg",
		"--kernel", filepath.Join(dir, "vmlinux"), "--initrd", filepath.Join(dir, "initramfs.cpio")}
}

func runCLI(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = run(ctx, &cliEnv{stdout: &out, stderr: &errOut}, args)
	return out.String(), errOut.String(), err
}

func TestCheckReportsAReadyMachine(t *testing.T) {
	dir, flags := checkFixture(t)
	out, errOut, err := runCLI(t, flags...)
	if err != nil {
		t.Fatalf("check failed: %v\n%s%s", err, out, errOut)
	}
	for _, want := range []string{
		"qemu       " + filepath.Join(dir, "qemu-system-x86_64") + " (QEMU emulator version 7.2.99 (fake))",
		"/dev/kvm   ",
		"kvm        ",
		"accel      tcg: tcg requested",
		"kernel     " + filepath.Join(dir, "vmlinux") + " (3.0 MiB)",
		"initramfs  " + filepath.Join(dir, "initramfs.cpio") + " (3.0 MiB)",
		"ok: boxes can run here",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestCheckFailsWithAOneLineFix(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(dir string, flags []string)
		want string
	}{
		{name: "kernel missing", edit: func(dir string, flags []string) { os.Remove(filepath.Join(dir, "vmlinux")) },
			want: "boxlite check: kernel " + "DIR/vmlinux missing: run make kernel\n"},
		{name: "initramfs missing", edit: func(dir string, flags []string) { os.Remove(filepath.Join(dir, "initramfs.cpio")) },
			want: "boxlite check: initramfs DIR/initramfs.cpio missing: run make initramfs\n"},
		{name: "qemu missing", edit: func(dir string, flags []string) { flags[2] = filepath.Join(dir, "nope") },
			want: "boxlite check: qemu binary DIR/nope not found: run make setup\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, flags := checkFixture(t)
			tc.edit(dir, flags)
			_, errOut, err := runCLI(t, flags...)
			if !errors.Is(err, errReported) {
				t.Errorf("check = %v, want a reported failure", err)
			}
			if want := strings.ReplaceAll(tc.want, "DIR", dir); errOut != want {
				t.Errorf("stderr = %q, want %q", errOut, want)
			}
		})
	}
}

func TestUnknownCommandIsAUsageError(t *testing.T) {
	_, errOut, err := runCLI(t, "frobnicate")
	if !errors.Is(err, errUsage) || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("run = %v, stderr %q", err, errOut)
	}
}

func TestCheckRejectsABadAccelerator(t *testing.T) {
	_, errOut, err := runCLI(t, "check", "--accel", "xen")
	if !errors.Is(err, errUsage) || !strings.Contains(errOut, `accelerator "xen"`) {
		t.Errorf("run = %v, stderr %q", err, errOut)
	}
}
