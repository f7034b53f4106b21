package main

import (
	"context"
	"io"

	"github.com/boxlite/boxlite/pkg/manager"
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
	box, done, err := getBox(ctx, *state, ref, true)
	if err != nil {
		return err
	}
	defer done()
	execID := "exec-" + manager.NewID()
	var stdin io.Reader
	if interactive {
		stdin = env.stdin
	}
	fifos, err := manager.NewFIFOs(box.Dir(), execID, stdin, env.stdout, env.stderr, tty)
	if err != nil {
		return err
	}
	defer fifos.Close()
	spec := manager.ExecSpec{Args: argv, Env: envs, Cwd: workdir, User: user, Terminal: tty}
	if err := box.Exec(ctx, execID, spec, fifos.Stdio()); err != nil {
		return err
	}
	code, _, err := attach(ctx, env, box, execID, fifos, tty)
	derr := box.DeleteExec(context.WithoutCancel(ctx), execID)
	if err == nil {
		drainOutput(env, fifos)
	}
	if err != nil {
		return joinErrors(err, derr)
	}
	if code != 0 {
		return exitCodeError{code: code}
	}
	return nil
}
