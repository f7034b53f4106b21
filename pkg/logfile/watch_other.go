//go:build !linux

package logfile

import (
	"context"
	"errors"
	"os"
)

// watcher would wake a follower when its log changes; following needs
// inotify, so there is none off Linux.
type watcher struct{}

// newWatcher fails: following a log needs Linux's inotify.
func newWatcher(*os.File) (*watcher, error) {
	return nil, errors.New("following a log needs inotify (Linux)")
}

func (*watcher) interruptOn(context.Context, <-chan struct{}) func() { return func() {} }
func (*watcher) wait() (bool, error)                                 { return false, nil }
func (*watcher) close() error                                        { return nil }
