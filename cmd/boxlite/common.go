package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
	"github.com/boxlite/boxlite/pkg/manager"
)

// errBadUsage marks a command line error; main prints it on one line and
// exits 2.
var errBadUsage = errors.New("bad usage")

// usageErrorf returns a one-line command line error for subcommand name.
func usageErrorf(name, format string, args ...any) error {
	return fmt.Errorf("%s: %s (see 'boxlite %s -h'): %w", name, fmt.Sprintf(format, args...), name, errBadUsage)
}

// parseFlags parses args into fs. A bad flag is one line (no usage dump);
// -h prints the usage and returns flag.ErrHelp.
func parseFlags(env *cliEnv, fs *flag.FlagSet, args []string) error {
	usage := fs.Usage
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(env.stderr)
	fs.Usage = usage
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.Usage()
		return err
	case err != nil:
		return usageErrorf(fs.Name(), "%v", err)
	}
	return nil
}

// stateFlag adds --state to fs; the default is the global --state, then
// $BOXLITE_STATE, then /run/boxlite.
func stateFlag(env *cliEnv, fs *flag.FlagSet) *string {
	def := env.state
	if def == "" {
		def = os.Getenv(manager.StateRootEnv)
	}
	if def == "" {
		def = manager.DefaultStateRoot
	}
	return fs.String("state", def, "state directory (also $"+manager.StateRootEnv+")")
}

// openBoxes returns the boxes the command works on: the daemon at the
// --url (or $BOXLITE_URL) given before the subcommand, else the state
// directory, through the same api.Boxes either way.
func openBoxes(env *cliEnv, state string) (api.Boxes, error) {
	if env.url != "" {
		token, err := readToken(env.tokenFile)
		if err != nil {
			return nil, err
		}
		return client.New(env.url, client.Options{Token: token})
	}
	return manager.NewService(manager.ServiceConfig{Config: manager.Config{StateRoot: state}})
}

// readToken reads a bearer token file ("" for none).
func readToken(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return token, nil
}

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// envFlag collects -e K=V (a bare K takes K's value from the environment,
// as docker does).
type envFlag []string

func (e *envFlag) String() string { return strings.Join(*e, ",") }
func (e *envFlag) Set(v string) error {
	k, _, ok := strings.Cut(v, "=")
	if k == "" {
		return fmt.Errorf("want K=V, got %q", v)
	}
	if !ok {
		val, set := os.LookupEnv(k)
		if !set {
			return nil
		}
		v = k + "=" + val
	}
	*e = append(*e, v)
	return nil
}

// parseSignal accepts a signal name (TERM, SIGTERM, term) or number.
func parseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return 0, fmt.Errorf("invalid signal %q", s)
	}
	sig, err := api.ParseSignal(s, 0)
	if err != nil {
		return 0, errors.New(err.Error())
	}
	return sig, nil
}

// memorySize is a size with an optional unit.
var memorySize = regexp.MustCompile(`^([0-9]+)([kmgt]?)(i?b)?$`)

// parseMemory accepts a size with an optional unit b, k, m, g or t (powers
// of 1024, "mb" and "mib" alike); a plain number is MiB.
func parseMemory(s string) (uint64, error) {
	m := memorySize.FindStringSubmatch(strings.ToLower(strings.TrimSpace(s)))
	if m == nil {
		return 0, fmt.Errorf("invalid memory size %q: want for example 256m or 1g", s)
	}
	n, err := strconv.ParseUint(m[1], 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid memory size %q: want for example 256m or 1g", s)
	}
	shift := map[string]uint{"k": 10, "m": 20, "g": 30, "t": 40}[m[2]]
	if m[2] == "" && m[3] == "" {
		shift = 20
	}
	if n > (1<<63)>>shift {
		return 0, fmt.Errorf("memory size %q is too large", s)
	}
	return n << shift, nil
}

// oneBox parses the single box reference a subcommand takes.
func oneBox(fs *flag.FlagSet) (string, error) {
	switch fs.NArg() {
	case 0:
		return "", usageErrorf(fs.Name(), "no box given")
	case 1:
		return fs.Arg(0), nil
	}
	return "", usageErrorf(fs.Name(), "one box only, got %d", fs.NArg())
}

// joinErrors is errors.Join on one line: the non-nil errors joined by "; ".
func joinErrors(errs ...error) error {
	var j joinedErrors
	for _, err := range errs {
		if err != nil {
			j = append(j, err)
		}
	}
	if len(j) == 0 {
		return nil
	}
	return j
}

// joinedErrors prints as one line and matches each of its errors.
type joinedErrors []error

func (j joinedErrors) Error() string {
	msgs := make([]string, len(j))
	for i, err := range j {
		msgs[i] = err.Error()
	}
	return strings.Join(msgs, "; ")
}

func (j joinedErrors) Unwrap() []error { return j }
