package main

import (
	"context"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
)

// runLogs prints a box's output, stdout to stdout and stderr to stderr;
// with -f it follows new output until the box's process exits.
func runLogs(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "logs", "logs [-f] [--since TIME|DURATION] ID|NAME")
	follow := fs.Bool("f", false, "follow the output until the box's process exits")
	since := fs.String("since", "", "only output since an RFC 3339 time, Unix seconds or a duration ago (10m)")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	ref, err := oneBox(fs)
	if err != nil {
		return err
	}
	var o api.LogsOptions
	o.Follow = *follow
	if *since != "" {
		t, err := api.ParseSince(*since, time.Now())
		if err != nil {
			return usageErrorf("logs", "--%v", err)
		}
		o.Since = t
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	err = boxes.Logs(ctx, ref, o, env.stdout, env.stderr)
	if ctx.Err() != nil {
		return nil // interrupted while following
	}
	return err
}
