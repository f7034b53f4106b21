package main

import (
	"context"
	"syscall"
)

// runKill sends a signal (default SIGTERM) to a box's process.
func runKill(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "kill", "kill [-s SIGNAL] ID|NAME")
	sigName := fs.String("s", "TERM", "signal, by name (TERM, SIGKILL) or number")
	all := fs.Bool("a", false, "signal every process in the box, not only its main one")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	sig, err := parseSignal(*sigName)
	if err != nil {
		return usageErrorf("kill", "%v", err)
	}
	ref, err := oneBox(fs)
	if err != nil {
		return err
	}
	box, done, err := getBox(ctx, *state, ref, true)
	if err != nil {
		return err
	}
	defer done()
	return box.Kill(ctx, "", syscall.Signal(sig), *all)
}
