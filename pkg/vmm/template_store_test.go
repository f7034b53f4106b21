package vmm

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The template directory: its lock, removal and listing.

// lockCtx is a context for an attempt to take a lock.
func lockCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// lockWithin runs lockFile bounded by a context of d, and fails the test if
// it does not return soon after that deadline: a lockFile that ignored its
// context would otherwise hang the suite.
func lockWithin(t *testing.T, path string, d time.Duration) (func(), error) {
	t.Helper()
	type result struct {
		unlock func()
		err    error
	}
	ch := make(chan result, 1)
	ctx := lockCtx(t, d)
	go func() {
		u, err := lockFile(ctx, path)
		ch <- result{u, err}
	}()
	select {
	case r := <-ch:
		return r.unlock, r.err
	case <-time.After(d + 5*time.Second):
		t.Fatalf("lockFile(%s) still waiting 5s after its deadline of %v", path, d)
		return nil, nil
	}
}

func TestLockFileExcludesAndHandsOver(t *testing.T) {
	checkLeaks(t)
	path := filepath.Join(t.TempDir(), ".lock-k")
	unlock, err := lockWithin(t, path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Held: another locker cannot have it before its deadline.
	if u, err := lockWithin(t, path, 100*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		if u != nil {
			u()
		}
		t.Fatalf("second lockFile while held: err = %v, want DeadlineExceeded", err)
	}

	var released atomic.Bool
	type result struct {
		unlock       func()
		err          error
		afterRelease bool
	}
	got := make(chan result, 1)
	go func() {
		u, err := lockFile(lockCtx(t, 10*time.Second), path)
		got <- result{u, err, released.Load()}
	}()
	select {
	case r := <-got:
		if r.unlock != nil {
			r.unlock()
		}
		t.Fatalf("second locker got the lock while the first held it (err %v)", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	released.Store(true)
	unlock()
	var r result
	select {
	case r = <-got:
	case <-time.After(15 * time.Second):
		t.Fatal("second locker did not get the lock after the first released it")
	}
	if r.err != nil {
		t.Fatalf("second locker after unlock: %v", r.err)
	}
	if !r.afterRelease {
		t.Fatal("second locker got the lock before the first released it")
	}
	// It holds it now.
	if _, err := lockWithin(t, path, 50*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("third lockFile while the second holds it: err = %v", err)
	}
	r.unlock()
	u, err := lockWithin(t, path, 5*time.Second)
	if err != nil {
		t.Fatalf("lockFile after both unlocked: %v", err)
	}
	u()
}

func TestLockFileCanceledWaitLeavesTheLockFree(t *testing.T) {
	for _, early := range []bool{false, true} {
		name := map[bool]string{false: "canceled while waiting", true: "canceled before the call"}[early]
		t.Run(name, func(t *testing.T) {
			checkLeaks(t)
			path := filepath.Join(t.TempDir(), ".lock-k")
			unlock, err := lockWithin(t, path, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if early {
				cancel()
			}
			done := make(chan error, 1)
			go func() {
				u, err := lockFile(ctx, path)
				if u != nil {
					u()
				}
				done <- err
			}()
			if !early {
				select {
				case err := <-done:
					t.Fatalf("lockFile returned while the lock was held and ctx live: %v", err)
				case <-time.After(50 * time.Millisecond):
				}
				cancel()
			}
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("err = %v, want context.Canceled", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("lockFile did not return once its ctx was canceled")
			}
			unlock()
			// The abandoned wait must not end up holding the lock.
			u, err := lockWithin(t, path, 5*time.Second)
			if err != nil {
				t.Fatalf("lockFile after the canceled wait: %v", err)
			}
			u()
		})
	}
}

func TestLockFileReportsAnUnusablePath(t *testing.T) {
	if _, err := lockFile(context.Background(), filepath.Join(t.TempDir(), "missing", ".lock-k")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
}

func TestRemoveTemplateRefusesWhatIsNotAKey(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "templates")
	victim := filepath.Join(base, "victim")
	for _, d := range []string{root, victim} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, key := range []string{"", ".", "..", "../victim", "a/b", "/", ".lock-x", ".build-1", "abc.def"} {
		t.Run(key, func(t *testing.T) {
			if err := RemoveTemplate(root, key); err == nil || !strings.Contains(err.Error(), "not a template key") {
				t.Fatalf("RemoveTemplate(%q) = %v, want a refusal", key, err)
			}
		})
	}
	for _, d := range []string{root, victim} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s: %v", d, err)
		}
	}
}

func TestRemoveTemplate(t *testing.T) {
	root := t.TempDir()
	dir := fakeTemplate(t, root, "0123456789abcdef", nil)
	other := fakeTemplate(t, root, "fedcba9876543210", nil)
	if err := RemoveTemplate(root, "0123456789abcdef"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("template still there: %v", err)
	}
	if _, err := openTemplate(other, "fedcba9876543210"); err != nil {
		t.Fatalf("the other template was harmed: %v", err)
	}
	// The lock file stays for builders that wait on it.
	if _, err := os.Stat(filepath.Join(root, templateLockPrefix+"0123456789abcdef")); err != nil {
		t.Errorf("lock file: %v", err)
	}
	if err := RemoveTemplate(root, "0123456789abcdef"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("removing it again: err = %v, want fs.ErrNotExist", err)
	}
}

func TestRemoveTemplateWaitsForItsBuilders(t *testing.T) {
	checkLeaks(t)
	root := t.TempDir()
	dir := fakeTemplate(t, root, "0123456789abcdef", nil)
	unlock, err := lockWithin(t, filepath.Join(root, templateLockPrefix+"0123456789abcdef"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var released atomic.Bool
	type result struct {
		err          error
		afterRelease bool
	}
	done := make(chan result, 1)
	go func() {
		err := RemoveTemplate(root, "0123456789abcdef")
		done <- result{err, released.Load()}
	}()
	select {
	case r := <-done:
		unlock()
		t.Fatalf("RemoveTemplate returned (%v) while a builder held the lock", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("template removed under its builder's lock: %v", err)
	}
	released.Store(true)
	unlock()
	select {
	case r := <-done:
		if r.err != nil || !r.afterRelease {
			t.Fatalf("RemoveTemplate = %v (after release: %v)", r.err, r.afterRelease)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RemoveTemplate did not return after the lock was released")
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("template still there: %v", err)
	}
}

func TestListTemplates(t *testing.T) {
	if metas, sizes, err := ListTemplates(filepath.Join(t.TempDir(), "missing")); err != nil || metas != nil || sizes != nil {
		t.Fatalf("ListTemplates of a missing root = %v, %v, %v; want nothing", metas, sizes, err)
	}
	root := t.TempDir()
	fakeTemplate(t, root, "aaaaaaaaaaaaaaaa", nil)
	fakeTemplate(t, root, "cccccccccccccccc", nil)
	// A directory without a meta is listed by its name.
	if err := os.Mkdir(filepath.Join(root, "bbbbbbbbbbbbbbbb"), 0o700); err != nil {
		t.Fatal(err)
	}
	// Builds in progress, locks, other hidden entries and plain files are not.
	for _, d := range []string{".build-123", ".hidden"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, ".build-123", templateMeta), []byte(`{"key":"dddddddddddddddd"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{templateLockPrefix + "aaaaaaaaaaaaaaaa", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	metas, sizes, err := ListTemplates(root)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, m := range metas {
		keys = append(keys, m.Key)
	}
	if want := []string{"aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"}; !slices.Equal(keys, want) {
		t.Fatalf("keys = %q, want %q", keys, want)
	}
	if metas[0].MemoryMiB != testTemplateMiB || metas[0].StateSize == 0 {
		t.Errorf("meta of aaaa… = %+v, want the published one", metas[0])
	}
	if len(sizes) != 3 {
		t.Fatalf("sizes = %v, want 3", sizes)
	}
	// The RAM file is sparse: a template takes the blocks its files use.
	if sizes[0] < metas[0].StateSize || sizes[0] >= testTemplateMiB<<20 {
		t.Errorf("size of aaaa… = %d, want at least the state's %d bytes and less than the RAM's apparent size",
			sizes[0], metas[0].StateSize)
	}
	if sizes[1] != 0 {
		t.Errorf("size of an empty directory = %d", sizes[1])
	}
}
