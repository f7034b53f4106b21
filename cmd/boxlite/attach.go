package main

import (
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/containerd/console"

	"github.com/boxlite/boxlite/pkg/api"
)

// terminalStdio is the CLI's side of a process's stdio for Attach and
// Exec: the terminal's stdin (with -i), stdout and stderr; SIGINT and
// SIGTERM forwarded to the process; with -t on a terminal, raw mode and
// its size, sent again on each SIGWINCH. release restores the terminal and
// stops forwarding; it may be called more than once.
func terminalStdio(env *cliEnv, interactive, tty bool) (stdio api.Stdio, release func()) {
	stdio = api.Stdio{Stdout: env.stdout, Stderr: env.stderr}
	if interactive {
		stdio.Stdin = env.stdin
	}
	var con console.Console
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	if tty {
		if f, ok := env.stdin.(*os.File); ok {
			if c, err := console.ConsoleFromFile(f); err == nil {
				con = c
				sigs = append(sigs, syscall.SIGWINCH)
			}
		}
	}
	signals := make(chan syscall.Signal, 8)
	resize := make(chan api.Size, 8)
	stdio.Signals, stdio.Resize = signals, resize
	sigc := make(chan os.Signal, 8)
	signal.Notify(sigc, sigs...)
	sendSize := func() {
		if size, err := con.Size(); err == nil && size.Width > 0 && size.Height > 0 {
			select {
			case resize <- api.Size{Width: uint32(size.Width), Height: uint32(size.Height)}:
			default:
			}
		}
	}
	reset := func() {}
	if con != nil {
		if err := con.SetRaw(); err == nil {
			reset = func() { con.Reset() }
		}
		sendSize()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for s := range sigc {
			if s == syscall.SIGWINCH {
				sendSize()
				continue
			}
			select {
			case signals <- s.(syscall.Signal):
			default:
			}
		}
	}()
	var once sync.Once
	return stdio, func() {
		once.Do(func() {
			signal.Stop(sigc)
			close(sigc)
			<-done
			reset()
		})
	}
}
