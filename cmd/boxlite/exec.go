package main

import (
	"context"

	"github.com/boxlite/boxlite/pkg/api"
)

// runExec runs another process in a running box with the terminal's stdio
// relayed and exits with its status.
func runExec(ctx context.Context, env *cliEnv, args []string) error {
	var interactive, tty bool
	var envs envFlag
	var workdir, user string
	fs := newFlagSet(env, "exec", "exec [-i] [-t] [-e K=V] [-w DIR] [-u UID[:GID]] ID|NAME -- CMD [ARGS...]")
	fs.BoolVar(&interactive, "i", false, "keep stdin open and relay it to the process")
	fs.BoolVar(&tty, "t", false, "give the process a terminal")
	fs.Var(&envs, "e", "set an environment variable K=V (repeatable)")
	fs.StringVar(&workdir, "w", "", "working directory (default: the box's)")
	fs.StringVar(&user, "u", "", "UID[:GID] or user name (default: the box's)")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageErrorf("exec", "no box given")
	}
	ref, argv := fs.Arg(0), fs.Args()[1:]
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return usageErrorf("exec", "no command given: boxlite exec ID -- CMD [ARGS...]")
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	stdio, release := terminalStdio(env, interactive, tty)
	defer release()
	req := api.ExecRequest{Cmd: argv, Env: envs, Cwd: workdir, User: user, TTY: tty, Stdin: interactive}
	// ctx ends at the first SIGINT/SIGTERM, which are the process's now.
	exit, err := boxes.Exec(context.WithoutCancel(ctx), ref, req, stdio)
	if err != nil {
		return err
	}
	if exit.Status != 0 {
		return exitCodeError{code: int(exit.Status)}
	}
	return nil
}
