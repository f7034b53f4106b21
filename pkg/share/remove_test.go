package share

import (
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"testing"

	"github.com/boxlite/boxlite/internal/mounttest"
)

func TestRemoveUnmountsEverythingAndKeepsTheSources(t *testing.T) {
	root := testRoot(t)
	rootfs, vol, ro, rec := filepath.Join(root, "rootfs"), filepath.Join(root, "vol"), filepath.Join(root, "ro"), filepath.Join(root, "rec")
	writeFiles(t, rootfs, map[string]string{"bin/sh": "#!", "etc/passwd": "root:x:0:0"})
	writeFiles(t, vol, map[string]string{"data/db": "rows"})
	writeFiles(t, ro, map[string]string{"config": "ro"})
	writeFiles(t, root, map[string]string{"hosts": "127.0.0.1 localhost"})
	writeFiles(t, rec, map[string]string{"top": "top"})
	mountTmpfs(t, filepath.Join(rec, "sub"), false)
	writeFiles(t, rec, map[string]string{"sub/inner": "inner"})
	before := tree(t, root)

	dir := filepath.Join(root, "share")
	s, err := Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []Bind{
		{Source: rootfs, Path: "c1/rootfs"},
		{Source: vol, Path: "c1/mounts/0"},
		{Source: ro, Path: "c1/mounts/1", ReadOnly: true},
		{Source: filepath.Join(root, "hosts"), Path: "c1/mounts/2"},
		{Source: rec, Path: "c2/mounts/0", Recursive: true},
		{Source: rootfs, Path: "c2/rootfs"},
	} {
		if err := s.Add(b); err != nil {
			t.Fatalf("Add(%+v): %v", b, err)
		}
	}
	if n := len(mounttest.Under(t, dir)); n != 8 {
		t.Fatalf("%d mounts under the share, want 8 (tmpfs, 6 binds, 1 submount)", n)
	}
	removeShare(t, dir)
	// Every file of every source is still there, unchanged.
	after := tree(t, root)
	if !maps.Equal(after, before) {
		t.Errorf("sources after Remove:\n%v\nwant:\n%v", after, before)
	}
	if err := Remove(dir); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func TestRemoveOfABusyShareFailsAndDeletesNothing(t *testing.T) {
	root := testRoot(t)
	src := filepath.Join(root, "src")
	writeFiles(t, src, map[string]string{"a": "a", "b/c": "c"})
	before := tree(t, src)
	s := newShare(t, root)
	if err := s.Add(Bind{Source: src, Path: "c1/rootfs"}); err != nil {
		t.Fatal(err)
	}
	// An open file keeps the bind mount busy: it cannot be unmounted.
	f, err := os.Open(filepath.Join(s.Dir(), "c1/rootfs/a"))
	if err != nil {
		t.Fatal(err)
	}
	err = Remove(s.Dir())
	f.Close()
	if err == nil {
		t.Fatal("Remove of a busy share succeeded")
	}
	if after := tree(t, src); !maps.Equal(after, before) {
		t.Errorf("source after a failed Remove: %v, want %v", after, before)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), "c1/rootfs/b/c")); err != nil {
		t.Errorf("the share after a failed Remove: %v", err)
	}
	// Once idle it goes (newShare's cleanup checks).
}

func TestRemoveOfAMissingShareIsNotAnError(t *testing.T) {
	root := testRoot(t)
	for _, dir := range []string{
		filepath.Join(root, "missing"),
		filepath.Join(root, "missing", "share"),
	} {
		if err := Remove(dir); err != nil {
			t.Errorf("Remove(%s) = %v, want nil", dir, err)
		}
		if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Remove(%s) made it: %v", dir, err)
		}
	}
}
