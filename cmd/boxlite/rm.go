package main

import (
	"context"
	"fmt"
)

// runRm removes boxes. A running box needs --force: its process is killed,
// its shim shut down and reaped, and its files removed.
func runRm(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "rm", "rm [--force] ID|NAME...")
	force := fs.Bool("force", false, "kill a running box first")
	fs.BoolVar(force, "f", false, "short for --force")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageErrorf("rm", "no box given")
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	failed := 0
	for _, ref := range fs.Args() {
		if err := boxes.Remove(context.WithoutCancel(ctx), ref, *force); err != nil {
			fmt.Fprintf(env.stderr, "boxlite: %v\n", err)
			failed++
			continue
		}
		fmt.Fprintln(env.stdout, ref)
	}
	if failed > 0 {
		return errReported
	}
	return nil
}
