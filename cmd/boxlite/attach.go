package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/containerd/console"

	"github.com/boxlite/boxlite/pkg/manager"
)

// ioDrainTimeout bounds the wait for a process's output once it exited and
// was deleted.
const ioDrainTimeout = 30 * time.Second

// attach starts process execID of box ("" for the box's own) with its
// FIFOs relayed, forwards SIGINT and SIGTERM to it (and terminal resizes
// with a terminal), waits for it, and returns its exit status. started says
// the process was started. When Wait returns the shim has written all of the
// process's output to the FIFOs, but it may keep its ends open until the
// process is deleted: callers delete it, then drainOutput.
func attach(ctx context.Context, env *cliEnv, box *manager.Box, execID string, fifos *manager.FIFOs, tty bool) (code int, started bool, err error) {
	if err := ctx.Err(); err != nil {
		return 0, false, fmt.Errorf("interrupted: %w", err)
	}
	// ctx ends at the first SIGINT/SIGTERM; from now on those are the
	// process's, so the calls below must outlive ctx.
	wctx := context.WithoutCancel(ctx)
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	var con console.Console
	if tty {
		if f, ok := env.stdin.(*os.File); ok {
			if c, err := console.ConsoleFromFile(f); err == nil {
				con = c
				sigs = append(sigs, syscall.SIGWINCH)
			}
		}
	}
	sigc := make(chan os.Signal, 8)
	signal.Notify(sigc, sigs...)
	if _, err := box.Start(wctx, execID); err != nil {
		signal.Stop(sigc)
		return 0, false, err
	}
	if con != nil {
		if err := con.SetRaw(); err == nil {
			defer con.Reset()
		}
		resize(wctx, box, execID, con)
	}
	exited := make(chan struct{})
	stdinClosed := make(chan struct{})
	go func() {
		// Stdin ended: tell the shim, as containerd's clients do.
		defer close(stdinClosed)
		select {
		case <-fifos.StdinDone():
			box.CloseStdin(wctx, execID)
		case <-exited:
		}
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for s := range sigc {
			if s == syscall.SIGWINCH {
				resize(wctx, box, execID, con)
				continue
			}
			if err := box.Kill(wctx, execID, s.(syscall.Signal), false); err != nil {
				fmt.Fprintf(env.stderr, "boxlite: forward %v: %v\n", s, err)
			}
		}
	}()
	exit, err := box.Wait(wctx, execID)
	signal.Stop(sigc)
	close(sigc)
	close(exited)
	<-done
	<-stdinClosed
	if err != nil {
		return 0, true, err
	}
	return int(exit.Status), true, nil
}

// drainOutput waits (bounded) until the relay of a deleted process's output
// reached EOF.
func drainOutput(env *cliEnv, fifos *manager.FIFOs) {
	if !fifos.Wait(ioDrainTimeout) {
		fmt.Fprintf(env.stderr, "boxlite: output still open %v after the process was deleted: it may be incomplete\n", ioDrainTimeout)
	}
}

// resize sets the process's terminal to the local terminal's size.
func resize(ctx context.Context, box *manager.Box, execID string, con console.Console) {
	size, err := con.Size()
	if err != nil || size.Width == 0 || size.Height == 0 {
		return
	}
	box.ResizePty(ctx, execID, uint32(size.Width), uint32(size.Height))
}
