package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Opening a published template: what it trusts and what it refuses.

// fakeTemplate publishes a fake template of key under root as build would:
// a sparse RAM file, a device state, its meta, files 0444 in a 0555
// directory. edit, when set, runs before the meta is written and the modes
// are set. It returns the template's directory.
func fakeTemplate(t *testing.T, root, key string, edit func(dir string, m *TemplateMeta)) string {
	t.Helper()
	dir := filepath.Join(root, key)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Make it removable again, whatever the test did to it.
	t.Cleanup(func() { os.Chmod(dir, 0o700) })
	if err := createSized(filepath.Join(dir, templateMemory), testTemplateMiB<<20); err != nil {
		t.Fatal(err)
	}
	state := []byte(strings.Repeat("QEVM device state ", 300))
	if err := os.WriteFile(filepath.Join(dir, templateState), state, 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(state)
	m := TemplateMeta{Key: key, Format: templateFormat, MemoryMiB: testTemplateMiB, Accel: AccelTCG, VCPUs: 1,
		StateSHA256: hex.EncodeToString(sum[:]), StateSize: int64(len(state))}
	if edit != nil {
		edit(dir, &m)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, templateMeta), b, 0o400); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{templateMemory, templateState, templateMeta} {
		p := filepath.Join(dir, name)
		if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() {
			if err := os.Chmod(p, 0o444); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestOpenTemplateAcceptsAPublishedTemplate(t *testing.T) {
	dir := fakeTemplate(t, t.TempDir(), "0123456789abcdef", nil)
	tm, err := openTemplate(dir, "0123456789abcdef")
	if err != nil {
		t.Fatalf("openTemplate: %v", err)
	}
	if tm.dir != dir || tm.meta.Key != "0123456789abcdef" || tm.meta.MemoryMiB != testTemplateMiB {
		t.Fatalf("openTemplate = %+v", tm)
	}
	// The owner may keep write permission for itself.
	if err := os.Chmod(filepath.Join(dir, templateMemory), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := openTemplate(dir, "0123456789abcdef"); err != nil {
		t.Fatalf("memory 0644: %v", err)
	}
}

func TestOpenTemplateRefusesWhatItCannotTrust(t *testing.T) {
	const key = "0123456789abcdef"
	// Edits of the template's content, made before it is published.
	writeState := func(b func([]byte) []byte) func(string, *TemplateMeta) {
		return func(dir string, _ *TemplateMeta) {
			p := filepath.Join(dir, templateState)
			old, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b(old), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name string
		// edit changes the template before it is published.
		edit func(dir string, m *TemplateMeta)
		// after changes it once it is published.
		after func(t *testing.T, dir string)
		// key is the key asked for (default key).
		key string
		// want is in the error.
		want string
		// is the error must match (optional).
		is error
	}{
		{
			name: "state with one byte changed",
			edit: writeState(func(b []byte) []byte { b = slices.Clone(b); b[len(b)/2] ^= 1; return b }),
			want: "damaged",
		},
		{
			name: "truncated state",
			edit: writeState(func(b []byte) []byte { return b[:len(b)-1] }),
			want: "damaged",
		},
		{
			name: "state longer than recorded",
			edit: writeState(func(b []byte) []byte { return append(slices.Clone(b), 0) }),
			want: "damaged",
		},
		{
			name: "meta records another state size",
			edit: func(_ string, m *TemplateMeta) { m.StateSize-- },
			want: "damaged",
		},
		{
			name: "memory of the wrong size",
			edit: func(dir string, _ *TemplateMeta) {
				if err := os.Truncate(filepath.Join(dir, templateMemory), testTemplateMiB<<20-4096); err != nil {
					t.Fatal(err)
				}
			},
			want: "want 33554432",
		},
		{
			name: "meta claims another memory size",
			edit: func(_ string, m *TemplateMeta) { m.MemoryMiB = 64 },
			want: "want 67108864",
		},
		{
			name: "memory writable by everyone",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateMemory), 0o666)
			},
			want: "others could write into every clone",
		},
		{
			name: "memory writable by its group",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateMemory), 0o460)
			},
			want: "others could write into every clone",
		},
		{
			name: "state writable by others",
			after: func(t *testing.T, dir string) {
				chmod(t, filepath.Join(dir, templateState), 0o446)
			},
			want: "others could write into every clone",
		},
		{
			name:  "directory writable by everyone",
			after: func(t *testing.T, dir string) { chmod(t, dir, 0o777) },
			want:  "others could write into every clone",
		},
		{
			name: "meta of another key",
			key:  "fedcba9876543210",
			want: "is of template " + key,
		},
		{
			name: "meta of another format",
			edit: func(_ string, m *TemplateMeta) { m.Format = templateFormat + 1 },
			want: "format",
		},
		{
			name: "no meta",
			after: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, templateMeta)); err != nil {
					t.Fatal(err)
				}
			},
			want: templateMeta,
			is:   fs.ErrNotExist,
		},
		{
			name: "garbage meta",
			after: func(t *testing.T, dir string) {
				p := filepath.Join(dir, templateMeta)
				chmod(t, p, 0o644)
				if err := os.WriteFile(p, []byte("{not json"), 0o644); err != nil {
					t.Fatal(err)
				}
				chmod(t, p, 0o444)
			},
			want: templateMeta,
		},
		{
			name: "memory is a symlink to a file of the right size",
			edit: func(dir string, _ *TemplateMeta) {
				p := filepath.Join(dir, templateMemory)
				elsewhere := filepath.Join(t.TempDir(), "memory")
				if err := createSized(elsewhere, testTemplateMiB<<20); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(elsewhere, 0o444); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(elsewhere, p); err != nil {
					t.Fatal(err)
				}
			},
			want: "not a regular file",
		},
		{
			name: "memory is a directory",
			edit: func(dir string, _ *TemplateMeta) {
				p := filepath.Join(dir, templateMemory)
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(p, 0o555); err != nil {
					t.Fatal(err)
				}
			},
			want: "not a regular file",
		},
		{
			name: "no state",
			edit: func(dir string, _ *TemplateMeta) {
				if err := os.Remove(filepath.Join(dir, templateState)); err != nil {
					t.Fatal(err)
				}
			},
			want: templateState,
			is:   fs.ErrNotExist,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := fakeTemplate(t, t.TempDir(), key, tt.edit)
			if tt.after != nil {
				tt.after(t, dir)
			}
			k := tt.key
			if k == "" {
				k = key
			}
			tm, err := openTemplate(dir, k)
			if err == nil {
				t.Fatalf("openTemplate = %+v, want an error", tm)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.is)
			}
		})
	}
}

// A template directory that does not exist reads as not built: ensure
// builds it rather than removing anything.
func TestOpenTemplateOfAMissingDirectoryIsNotExist(t *testing.T) {
	_, err := openTemplate(filepath.Join(t.TempDir(), "0123456789abcdef"), "0123456789abcdef")
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
}

func TestOpenTemplateRefusesAnotherUsersFiles(t *testing.T) {
	needRoot(t)
	const key = "0123456789abcdef"
	for _, name := range []string{"", templateMemory, templateState} {
		t.Run("owner of "+filepath.Join("template", name), func(t *testing.T) {
			dir := fakeTemplate(t, t.TempDir(), key, nil)
			if err := os.Lchown(filepath.Join(dir, name), 65534, 65534); err != nil {
				t.Fatal(err)
			}
			if _, err := openTemplate(dir, key); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
				t.Fatalf("err = %v, want a refusal naming uid 65534", err)
			}
		})
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func TestTemplateMetaStale(t *testing.T) {
	dir := t.TempDir()
	files := []string{filepath.Join(dir, "qemu"), filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd")}
	fresh := func(t *testing.T) *TemplateMeta {
		t.Helper()
		m := &TemplateMeta{Files: map[string]string{}}
		for _, p := range files {
			if err := os.WriteFile(p, []byte("v1 of "+p), 0o644); err != nil {
				t.Fatal(err)
			}
			id, err := fileIdentity(p)
			if err != nil {
				t.Fatal(err)
			}
			m.Files[p] = id
		}
		return m
	}
	if (&TemplateMeta{}).Stale() {
		t.Error("a meta without files is stale")
	}
	tests := []struct {
		name  string
		edit  func(t *testing.T)
		stale bool
	}{
		{"unchanged", func(*testing.T) {}, false},
		{"read", func(t *testing.T) {
			if _, err := os.ReadFile(files[0]); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"rewritten", func(t *testing.T) {
			if err := os.WriteFile(files[1], []byte("v2, longer than v1 of it"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"touched", func(t *testing.T) {
			old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
			if err := os.Chtimes(files[2], old, old); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"removed", func(t *testing.T) {
			if err := os.Remove(files[0]); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"replaced by a rename", func(t *testing.T) {
			st, err := os.Stat(files[1])
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(files[1])
			tmp := files[1] + ".new"
			if err := os.WriteFile(tmp, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(tmp, st.ModTime(), st.ModTime()); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, files[1]); err != nil {
				t.Fatal(err)
			}
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := fresh(t)
			if m.Stale() {
				t.Fatal("stale right after its identities were recorded")
			}
			tt.edit(t)
			if got := m.Stale(); got != tt.stale {
				t.Fatalf("Stale() = %v, want %v", got, tt.stale)
			}
		})
	}
}

// ensure uses a published template of the config's shape as it is, and
// removes one it cannot trust before building it again.
func TestTemplatesEnsure(t *testing.T) {
	c := shapeConfig(t)
	c.NICs = []NIC{{MAC: testMAC(2), User: &UserNet{}}}
	shape, err := templateShape(c, AccelTCG)
	if err != nil {
		t.Fatal(err)
	}
	ready := func(context.Context, string) error {
		t.Error("ensure built a template")
		return errors.New("no builds here")
	}

	t.Run("published", func(t *testing.T) {
		root := t.TempDir()
		dir := fakeTemplate(t, root, shape.Key, nil)
		ts := &Templates{Dir: root, Ready: ready}
		tm, err := ts.ensure(testCtx(t, 10*time.Second), c, AccelTCG)
		if err != nil {
			t.Fatal(err)
		}
		if tm.dir != dir || tm.meta.Key != shape.Key {
			t.Fatalf("ensure = %+v, want the template in %s", tm, dir)
		}
	})

	t.Run("damaged", func(t *testing.T) {
		root := t.TempDir()
		dir := fakeTemplate(t, root, shape.Key, func(_ string, m *TemplateMeta) { m.StateSize++ })
		// The rebuild fails early here: the "QEMU binary" is not executable.
		ts := &Templates{Dir: root, Ready: ready}
		_, err := ts.ensure(testCtx(t, 10*time.Second), c, AccelTCG)
		if err == nil || !strings.Contains(err.Error(), "build VM template "+shape.Key) || !strings.Contains(err.Error(), c.QEMUBinary) {
			t.Fatalf("err = %v, want a build that failed on %s", err, c.QEMUBinary)
		}
		if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("damaged template kept: %v", err)
		}
		if left, _ := filepath.Glob(filepath.Join(root, templateBuildPrefix+"*")); len(left) != 0 {
			t.Fatalf("failed build left %v", left)
		}
	})
}
