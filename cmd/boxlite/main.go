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
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// command is one subcommand.
type command struct {
	// name is what the user types; summary is one line for the usage.
	name, summary string
	// run executes the subcommand with its arguments (after the name).
	run func(ctx context.Context, env *cliEnv, args []string) error
}

// cliEnv is where a subcommand reads and writes.
type cliEnv struct {
	// stdin is the terminal or pipe boxlite run -i and exec -i relay.
	stdin io.Reader
	// stdout and stderr get the subcommand's output.
	stdout, stderr io.Writer
	// state is the state directory given before the subcommand (--state),
	// or "" for the default.
	state string
	// url is the daemon to drive (--url or $BOXLITE_URL), "" for local;
	// tokenFile holds its bearer token (--token-file or
	// $BOXLITE_TOKEN_FILE).
	url, tokenFile string
}

// commands lists the subcommands in the order usage shows them.
func commands() []command {
	return []command{
		{name: "check", summary: "report whether boxes can run on this machine, and how to fix it if not", run: runCheck},
		{name: "run", summary: "run a command in a new box and exit with its status", run: runRun},
		{name: "create", summary: "create a box without starting its process; print its id", run: runCreate},
		{name: "start", summary: "start a created box's process", run: runStart},
		{name: "ps", summary: "list boxes", run: runPs},
		{name: "exec", summary: "run another command in a running box", run: runExec},
		{name: "kill", summary: "send a signal to a box's process", run: runKill},
		{name: "rm", summary: "remove boxes (a running one only with --force)", run: runRm},
		{name: "inspect", summary: "print a box's record (JSON, or a --format template)", run: runInspect},
		{name: "events", summary: "print the events of every box until interrupted", run: runEvents},
		{name: "image", summary: "pull, load, list and remove the images boxes run (boxlite run IMAGE)", run: runImage},
		{name: "template", summary: "list and remove the VM templates boxes are restored from", run: runTemplate},
		{name: "logs", summary: "print a box's output (-f: follow it)", run: runLogs},
		{name: "serve", summary: "serve the REST API: a daemon that owns and reaps its boxes' shims", run: runServe},
	}
}

// errUsage means the command line was wrong; usage was already printed.
var errUsage = errors.New("usage")

// exitCodeError makes boxlite exit with a box's exit status.
type exitCodeError struct{ code int }

func (e exitCodeError) Error() string { return "exit status " + strconv.Itoa(e.code) }

// errReported means the subcommand already told the user what went wrong.
var errReported = errors.New("reported")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// A reader that went away (boxlite run ... | head -1) must not kill the
	// manager mid-box: writes fail with EPIPE instead, and the output is
	// dropped while the box runs to its end.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	err := run(ctx, &cliEnv{stdin: os.Stdin, stdout: &dropAfterError{w: os.Stdout}, stderr: &dropAfterError{w: os.Stderr}}, os.Args[1:])
	stop()
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		os.Exit(2)
	case errors.Is(err, errBadUsage):
		fmt.Fprintf(os.Stderr, "boxlite: %s\n", strings.TrimSuffix(err.Error(), ": "+errBadUsage.Error()))
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

// dropAfterError passes writes to w until one fails, then drops the rest.
type dropAfterError struct {
	w      io.Writer
	mu     sync.Mutex
	failed bool
}

func (d *dropAfterError) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.failed {
		if _, err := d.w.Write(p); err != nil {
			d.failed = true
		}
	}
	return len(p), nil
}

// globalFlags are the flags given before the subcommand; each takes a
// value.
var globalFlags = []string{"state", "url", "token-file"}

// run dispatches args to a subcommand. --state DIR, --url URL and
// --token-file FILE before the subcommand apply to it.
func run(ctx context.Context, env *cliEnv, args []string) error {
	if env.url == "" {
		env.url = os.Getenv("BOXLITE_URL")
	}
	if env.tokenFile == "" {
		env.tokenFile = os.Getenv("BOXLITE_TOKEN_FILE")
	}
	for len(args) > 0 {
		name, value, hasValue := strings.Cut(strings.TrimLeft(args[0], "-"), "=")
		if !strings.HasPrefix(args[0], "-") || !slices.Contains(globalFlags, name) {
			break
		}
		if !hasValue {
			if len(args) < 2 {
				fmt.Fprintf(env.stderr, "boxlite: --%s needs a value\n", name)
				return errUsage
			}
			value, args = args[1], args[1:]
		}
		args = args[1:]
		switch name {
		case "state":
			env.state = value
		case "url":
			env.url = value
		case "token-file":
			env.tokenFile = value
		}
	}
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
	fmt.Fprintln(w, "\nglobal flags (before the command):")
	fmt.Fprintln(w, "  --state DIR        state directory (also $BOXLITE_STATE; default /run/boxlite)")
	fmt.Fprintln(w, "  --url URL          drive the daemon at URL instead: unix:///run/boxlite/boxlite.sock, tcp://HOST:PORT (also $BOXLITE_URL)")
	fmt.Fprintln(w, "  --token-file FILE  bearer token for a TCP daemon (also $BOXLITE_TOKEN_FILE)")
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
