package main

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/boxlite/boxlite/pkg/manager"
)

// runEvents serves the events socket and prints every event the shims
// publish, one line each (TIME TOPIC ID [exec_id] [exit status]), until
// interrupted. Exits are recorded in the boxes' records.
func runEvents(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "events", "events")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("events", "unexpected argument %q", fs.Arg(0))
	}
	m, err := openManager(*state)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	es, err := manager.ServeEvents(m.Store(), func(ev manager.Event) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintln(env.stdout, ev.String())
	})
	if errors.Is(err, manager.ErrEventsBusy) {
		return fmt.Errorf("%v: stop it first (only one listener can own the socket)", err)
	}
	if err != nil {
		return err
	}
	<-ctx.Done()
	return es.Close()
}
