package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/manager"
)

// runPs lists the boxes. Each record is reconciled first: a live shim is
// asked for the task's state; a box whose shim or VMM died is marked stopped
// with exit 137 and its stale files removed.
func runPs(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "ps", "ps [-q] [--status S] [-l K[=V]]")
	quiet := fs.Bool("q", false, "print the ids only")
	var statuses, labels multiFlag
	fs.Var(&statuses, "status", "only boxes in this status: created, running, paused, stopped, unknown (repeatable)")
	fs.Var(&labels, "l", "only boxes with this label K or K=V (repeatable)")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("ps", "unexpected argument %q", fs.Arg(0))
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	recs, listErr := boxes.List(ctx, api.ListFilter{Status: statuses, Labels: labels})
	if *quiet {
		for _, r := range recs {
			fmt.Fprintln(env.stdout, r.ID)
		}
	} else {
		printTable(env, recs)
	}
	if listErr != nil {
		for _, line := range strings.Split(listErr.Error(), "\n") {
			fmt.Fprintf(env.stderr, "boxlite: %s\n", line)
		}
		return errReported
	}
	return nil
}

func printTable(env *cliEnv, recs []api.Box) {
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tNAME\tSTATUS\tEXIT\tSHIM-PID\tVMM-PID\tHEALTH\tCOMMAND")
	for _, r := range recs {
		exit, health := "-", dash(r.Health)
		if r.Status == string(manager.StatusStopped) {
			// A stopped box has no health; inspect keeps the last one.
			exit, health = strconv.FormatUint(uint64(r.ExitStatus), 10), "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, dash(r.Name), r.Status, exit,
			pid(r.ShimPid), pid(r.VMMPid), health, clipCommand(r.Command))
	}
	w.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func pid(p int) string {
	if p <= 0 {
		return "-"
	}
	return strconv.Itoa(p)
}

// clipCommand joins the command for the table, shortened to 40 runes.
func clipCommand(args []string) string {
	s := strings.Join(args, " ")
	if r := []rune(s); len(r) > 40 {
		return string(r[:39]) + "…"
	}
	return s
}
