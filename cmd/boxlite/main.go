// Command boxlite is the thin manager CLI of boxlite: it drives the same
// shim containerd does, without containerd. Each subcommand lives in its own
// file and is listed in commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// command is one subcommand.
type command struct {
	// name is what the user types; summary is one line for the usage.
	name, summary string
	// run executes the subcommand with its arguments (after the name).
	run func(ctx context.Context, env *cliEnv, args []string) error
}

// cliEnv is where a subcommand writes.
type cliEnv struct {
	stdout, stderr io.Writer
}

// commands lists the subcommands in the order usage shows them.
func commands() []command {
	return []command{
		{name: "check", summary: "report whether boxes can run on this machine, and how to fix it if not", run: runCheck},
		{name: "run", summary: "run a command in a new box and exit with its status", run: runRun},
	}
}

// errUsage means the command line was wrong; usage was already printed.
var errUsage = errors.New("usage")

// errReported means the subcommand already told the user what went wrong.
var errReported = errors.New("reported")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, &cliEnv{stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:])
	stop()
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		os.Exit(2)
	case errors.As(err, new(exitCodeError)):
		var e exitCodeError
		errors.As(err, &e)
		os.Exit(e.code)
	case errors.Is(err, errReported):
		os.Exit(1)
	default:
		fmt.Fprintf(os.Stderr, "boxlite: %v\n", err)
		os.Exit(1)
	}
}

// run dispatches args to a subcommand.
func run(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(env.stderr)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(ctx, env, args[1:])
			if errors.Is(err, flag.ErrHelp) {
				return nil
			}
			return err
		}
	}
	fmt.Fprintf(env.stderr, "boxlite: unknown command %q\n", args[0])
	usage(env.stderr)
	return errUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: boxlite <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'boxlite <command> -h' for a command's flags.")
}

// newFlagSet returns a flag set for a subcommand that reports errors
// instead of exiting.
func newFlagSet(env *cliEnv, name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintf(env.stderr, "usage: boxlite %s\n\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}
