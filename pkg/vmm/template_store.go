package vmm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// The template directory: locking, listing, removing, sweeping.

// lockFile takes an exclusive flock on path, waiting as long as ctx allows.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	got := make(chan error, 1)
	go func() { got <- unix.Flock(int(f.Fd()), unix.LOCK_EX) }()
	select {
	case err := <-got:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		return func() { f.Close() }, nil
	case <-ctx.Done():
		// The flock, once it is granted, is released with the file.
		go func() { <-got; f.Close() }()
		return nil, fmt.Errorf("wait for the template lock %s: %w", path, ctx.Err())
	}
}

// removeStaleTemplates removes the templates whose files changed and the
// leftovers of builds that died (their lock is free).
func removeStaleTemplates(root string) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range entries {
		path := filepath.Join(root, e.Name())
		switch {
		case strings.HasPrefix(e.Name(), templateLockPrefix):
			continue
		case strings.HasPrefix(e.Name(), templateBuildPrefix):
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = removeTemplateDir(path)
			}
		default:
			m, err := ReadTemplateMeta(path)
			if err == nil && m.Stale() {
				log.L.WithField("template", m.Key).Info("removing stale VM template")
				_ = RemoveTemplate(root, m.Key)
			}
		}
	}
}

// ReadTemplateMeta reads the meta of the template in dir.
func ReadTemplateMeta(dir string) (TemplateMeta, error) {
	var m TemplateMeta
	b, err := os.ReadFile(filepath.Join(dir, templateMeta))
	if err != nil {
		return m, err
	}
	err = json.Unmarshal(b, &m)
	return m, err
}

// ListTemplates returns the metas of the templates under root, with the
// size of each (the blocks its files take).
func ListTemplates(root string) ([]TemplateMeta, []int64, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	var metas []TemplateMeta
	var sizes []int64
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() {
			continue
		}
		m, err := ReadTemplateMeta(filepath.Join(root, e.Name()))
		if err != nil {
			m = TemplateMeta{Key: e.Name()}
		}
		metas = append(metas, m)
		sizes = append(sizes, diskUsage(filepath.Join(root, e.Name())))
	}
	return metas, sizes, nil
}

func diskUsage(dir string) int64 {
	var n int64
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, e.Name()), &st) == nil {
			n += st.Blocks * 512
		}
	}
	return n
}

// RemoveTemplate removes the template key under root, under its builders'
// lock. Clones running from it keep their mappings of its files.
func RemoveTemplate(root, key string) error {
	if key == "" || strings.ContainsAny(key, "/.") {
		return fmt.Errorf("template %q: not a template key", key)
	}
	dir := filepath.Join(root, key)
	if fi, err := os.Lstat(dir); err != nil {
		return err
	} else if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory: refused", dir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	unlock, err := lockFile(ctx, filepath.Join(root, templateLockPrefix+key))
	if err != nil {
		return err
	}
	defer unlock()
	// The lock file stays: a builder waiting on it must not end up
	// holding the lock of a file a newcomer no longer finds.
	return removeTemplateDir(dir)
}

// removeTemplateDir removes a template or build directory, made writable
// again first (published ones are 0555: only root could remove them as
// they are). A symlink is removed, never followed.
func removeTemplateDir(dir string) error {
	if fi, err := os.Lstat(dir); err == nil && fi.IsDir() {
		_ = os.Chmod(dir, 0o700)
	}
	return os.RemoveAll(dir)
}
