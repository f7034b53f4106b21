package main

import (
	"context"

	"github.com/boxlite/boxlite/pkg/api"
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
	if _, err := parseSignal(*sigName); err != nil {
		return usageErrorf("kill", "%v", err)
	}
	ref, err := oneBox(fs)
	if err != nil {
		return err
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	return boxes.Kill(ctx, ref, api.KillRequest{Signal: *sigName, All: *all})
}
