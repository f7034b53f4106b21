package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/template"
)

// runInspect prints a box's record as JSON, or through a text/template.
func runInspect(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "inspect", "inspect [--format TEMPLATE] ID|NAME")
	format := fs.String("format", "", "Go template over the record, e.g. '{{.ShimPid}} {{.VMMPid}}'")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	ref, err := oneBox(fs)
	if err != nil {
		return err
	}
	var tmpl *template.Template
	if *format != "" {
		tmpl, err = template.New("format").Funcs(template.FuncMap{
			"json": func(v any) (string, error) {
				b, err := json.Marshal(v)
				return string(b), err
			},
			"join": strings.Join,
		}).Parse(*format)
		if err != nil {
			return usageErrorf("inspect", "--format: %v", err)
		}
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	rec, err := boxes.Inspect(ctx, ref)
	if err != nil {
		return err
	}
	if tmpl == nil {
		data, err := json.MarshalIndent(rec, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintf(env.stdout, "%s\n", data)
		return nil
	}
	var b strings.Builder
	if err := tmpl.Execute(&b, rec); err != nil {
		return fmt.Errorf("inspect: --format: %w", err)
	}
	out := b.String()
	if !strings.HasSuffix(out, "\n") {
		out += "\n"
	}
	fmt.Fprint(env.stdout, out)
	return nil
}
