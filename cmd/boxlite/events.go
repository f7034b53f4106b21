package main

import (
	"context"
	"fmt"
	"sync"

	"github.com/boxlite/boxlite/pkg/api"
)

// runEvents prints every event the shims publish, one line each (TIME
// TOPIC ID [exec_id] [exit status] [health]), until interrupted. Locally it
// serves the events socket (and records exits); with --url it streams the
// daemon's.
func runEvents(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "events", "events")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("events", "unexpected argument %q", fs.Arg(0))
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	var mu sync.Mutex
	return boxes.Events(ctx, func(ev api.Event) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintln(env.stdout, ev.String())
	})
}
