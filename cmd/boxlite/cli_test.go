package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// stateDir returns a short state directory for CLI tests.
func stateDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bxc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestBadCommandLinesAreOneLineUsageErrors(t *testing.T) {
	st := stateDir(t)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"run", "--bogus"}, "run: flag provided but not defined: -bogus (see 'boxlite run -h')"},
		{"no image or rootfs", []string{"run", "--state", st}, "run: give an IMAGE [CMD...], or --rootfs DIR -- CMD [ARGS...]"},
		{"no command", []string{"run", "--state", st, "--rootfs", st}, "run: no command given"},
		{"detach and interactive", []string{"run", "--state", st, "-d", "-i", "--rootfs", st, "--", "true"}, "-d cannot be combined"},
		{"bad memory", []string{"run", "--state", st, "--memory", "lots", "--rootfs", st, "--", "true"}, `invalid memory size "lots"`},
		{"bad health interval", []string{"run", "--state", st, "--health-interval", "soon", "--rootfs", st, "--", "true"}, `--health-interval="soon": want a duration`},
		{"bad health retries", []string{"create", "--state", st, "--health-retries", "0", "--rootfs", st, "--", "true"}, `--health-retries="0": want 1 to 1000`},
		{"health tuning without health", []string{"run", "--state", st, "--no-health-check", "--health-timeout", "1s", "--rootfs", st, "--", "true"}, "--health-timeout makes no sense with --no-health-check"},
		{"kill without box", []string{"kill", "--state", st}, "kill: no box given"},
		{"kill bad signal", []string{"kill", "--state", st, "-s", "NOPE", "x"}, `invalid signal "NOPE"`},
		{"rm without box", []string{"rm", "--state", st}, "rm: no box given"},
		{"exec without command", []string{"exec", "--state", st, "x"}, "exec: no command given"},
		{"inspect bad template", []string{"inspect", "--state", st, "--format", "{{.Nope", "x"}, "inspect: --format"},
		{"image without subcommand", []string{"image"}, "image: want pull REF, load FILE.tar, ls or rm REF..."},
		{"image load without file", []string{"image", "load", "--state", st}, "image load: one tarball, please"},
		{"ps with argument", []string{"ps", "--state", st, "extra"}, `ps: unexpected argument "extra"`},
		{"template without subcommand", []string{"template"}, "template: want build, ls or rm KEY..."},
		{"template build bad network", []string{"template", "build", "--dir", st, "--network", "netns:/x"}, `template build: --network "netns:/x": want user or none`},
		{"template rm without keys", []string{"template", "rm", "--dir", st}, "template rm: name templates by KEY"},
		{"template rm keys and --all", []string{"template", "rm", "--dir", st, "--all", "k"}, "template rm: name templates by KEY"},
		{"template rm --stale and --all", []string{"template", "rm", "--dir", st, "--all", "--stale"}, "template rm: name templates by KEY"},
		{"template ls with argument", []string{"template", "ls", "--dir", st, "x"}, `template ls: unexpected argument "x"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, err := runCLI(t, tt.args...)
			if !errors.Is(err, errBadUsage) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want a usage error with %q", err, tt.want)
			}
			if out != "" || errOut != "" {
				t.Errorf("printed %q / %q besides the one-line error", out, errOut)
			}
		})
	}
}

func TestUnknownBoxesAreReportedByName(t *testing.T) {
	st := stateDir(t)
	for _, args := range [][]string{
		{"kill", "--state", st, "nosuch"},
		{"inspect", "--state", st, "nosuch"},
		{"start", "--state", st, "nosuch"},
		{"exec", "--state", st, "nosuch", "--", "true"},
	} {
		_, _, err := runCLI(t, args...)
		if err == nil || err.Error() != "no such box: nosuch" {
			t.Errorf("%s: %v, want \"no such box: nosuch\"", args[0], err)
		}
	}
	_, errOut, err := runCLI(t, "rm", "--state", st, "nosuch")
	if !errors.Is(err, errReported) || errOut != "boxlite: no such box: nosuch\n" {
		t.Errorf("rm: %v, %q", err, errOut)
	}
}

func TestRunRejectsAMissingRootfsBeforeCreatingAnything(t *testing.T) {
	st := stateDir(t)
	_, _, err := runCLI(t, "run", "--state", st, "--rootfs", filepath.Join(st, "nope"), "--", "true")
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("err = %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(st, "boxes")); len(entries) > 0 {
		t.Errorf("left %d box directories", len(entries))
	}
}

func TestAnUnwritableStateDirectoryIsOneLine(t *testing.T) {
	_, _, err := runCLI(t, "ps", "--state", "/proc/boxlite-state")
	if err == nil || !strings.Contains(err.Error(), "state directory /proc/boxlite-state is not usable") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("err = %v", err)
	}
}

func TestPsOfAnEmptyStateDirectoryPrintsTheHeader(t *testing.T) {
	out, _, err := runCLI(t, "--state", stateDir(t), "ps")
	if err != nil || !strings.HasPrefix(out, "ID") || !strings.Contains(out, "SHIM-PID  VMM-PID  HEALTH  COMMAND") {
		t.Fatalf("ps: %q, %v", out, err)
	}
}

func TestParseSignalAcceptsNamesAndNumbers(t *testing.T) {
	tests := []struct {
		in   string
		want syscall.Signal
		ok   bool
	}{
		{"TERM", syscall.SIGTERM, true}, {"SIGKILL", syscall.SIGKILL, true}, {"int", syscall.SIGINT, true},
		{"9", syscall.SIGKILL, true}, {"0", 0, false}, {"65", 0, false}, {"NOPE", 0, false}, {"", 0, false},
	}
	for _, tt := range tests {
		got, err := parseSignal(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSignal(%q) = %v, %v", tt.in, got, err)
		}
	}
}

func TestParseMemoryAcceptsUnits(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"256", 256 << 20, true}, {"256m", 256 << 20, true}, {"256MiB", 256 << 20, true}, {"1g", 1 << 30, true},
		{"512k", 512 << 10, true}, {"4096b", 4096, true}, {"0", 0, false}, {"-1", 0, false}, {"lots", 0, false},
		{"99999999999999g", 0, false},
	}
	for _, tt := range tests {
		got, err := parseMemory(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseMemory(%q) = %v, %v", tt.in, got, err)
		}
	}
}

func TestTemplateLsAndRm(t *testing.T) {
	dir := filepath.Join(stateDir(t), "templates")
	out, _, err := runCLI(t, "template", "ls", "--dir", dir)
	if err != nil || strings.Count(out, "\n") != 1 || !strings.HasPrefix(out, "KEY") {
		t.Fatalf("ls of no templates: %q, %v; want the header only", out, err)
	}
	// A published template's shape, as vmm writes it.
	tdir := filepath.Join(dir, "0123456789abcdef")
	if err := os.MkdirAll(tdir, 0o755); err != nil {
		t.Fatal(err)
	}
	meta := `{"key":"0123456789abcdef","format":1,"files":{"/nonexistent/vmlinux":"1:2:3:4.5"},"accel":"tcg","memory_mib":256,"vcpus":1,"nics":["tap"]}`
	if err := os.WriteFile(filepath.Join(tdir, "meta.json"), []byte(meta), 0o444); err != nil {
		t.Fatal(err)
	}
	os.Chmod(tdir, 0o555)
	out, _, err = runCLI(t, "template", "ls", "--dir", dir)
	if err != nil || !strings.Contains(out, "0123456789abcdef  256 MiB  1      tap   tcg") || !strings.HasSuffix(strings.TrimSpace(out), "true") {
		t.Fatalf("ls: %q, %v; want the template, stale (its kernel is gone)", out, err)
	}
	if _, _, err := runCLI(t, "template", "rm", "--dir", dir, "../etc"); err == nil {
		t.Error("rm ../etc: no error")
	}
	out, _, err = runCLI(t, "template", "rm", "--dir", dir, "--stale")
	if err != nil || out != "0123456789abcdef\n" {
		t.Fatalf("rm --stale: %q, %v", out, err)
	}
	if _, err := os.Stat(tdir); !os.IsNotExist(err) {
		t.Errorf("template still there after rm: %v", err)
	}
}
