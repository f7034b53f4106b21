package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxlite/boxlite/pkg/agent"
	"github.com/boxlite/boxlite/pkg/vmm"
)

// runTemplate lists and removes the VM templates boxes are restored from
// (built on first use by the shim, under vmm.DefaultTemplateDir).
func runTemplate(ctx context.Context, env *cliEnv, args []string) error {
	sub := map[string]func(context.Context, *cliEnv, []string) error{"ls": runTemplateLs, "rm": runTemplateRm, "build": runTemplateBuild}
	if len(args) == 0 || sub[args[0]] == nil {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(env.stderr, "usage: boxlite template build [flags] | ls | rm (KEY... | --stale | --all)")
			return nil
		}
		return usageErrorf("template", "want build, ls or rm KEY...")
	}
	return sub[args[0]](ctx, env, args[1:])
}

func templateDirFlag(fs interface {
	String(name, value, usage string) *string
}) *string {
	return fs.String("dir", vmm.TemplateDir(), "the template directory ($BOXLITE_TEMPLATE_DIR)")
}

func runTemplateLs(_ context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "template ls", "template ls [--dir DIR]")
	dir := templateDirFlag(fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("template ls", "unexpected argument %q", fs.Arg(0))
	}
	metas, sizes, err := vmm.ListTemplates(*dir)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KEY\tMEMORY\tVCPUS\tNICS\tACCEL\tSIZE\tBUILD TIME\tBUILT\tSTALE")
	for i, m := range metas {
		nics := strings.Join(m.NICs, ",")
		if nics == "" {
			nics = "-"
		}
		fmt.Fprintf(w, "%s\t%d MiB\t%d\t%s\t%s\t%.1f MiB\t%v\t%s\t%v\n", m.Key, m.MemoryMiB, m.VCPUs, nics, m.Accel,
			float64(sizes[i])/(1<<20), m.BuildTime.Round(time.Millisecond), m.Built.Format(time.RFC3339), m.Stale())
	}
	return w.Flush()
}

func runTemplateRm(_ context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "template rm", "template rm [--dir DIR] (KEY... | --stale | --all)")
	dir := templateDirFlag(fs)
	stale := fs.Bool("stale", false, "remove the templates whose QEMU, kernel or initrd changed")
	all := fs.Bool("all", false, "remove every template")
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	keys := fs.Args()
	if (len(keys) > 0) == (*stale || *all) || (*stale && *all) {
		return usageErrorf("template rm", "name templates by KEY, or use one of --stale and --all")
	}
	if *stale || *all {
		metas, _, err := vmm.ListTemplates(*dir)
		if err != nil {
			return err
		}
		for _, m := range metas {
			if *all || m.Stale() {
				keys = append(keys, m.Key)
			}
		}
	}
	var errs []error
	for _, k := range keys {
		if err := vmm.RemoveTemplate(*dir, k); err != nil {
			errs = append(errs, fmt.Errorf("template %s: %w", k, err))
			continue
		}
		fmt.Fprintln(env.stdout, k)
	}
	return errors.Join(errs...)
}

// runTemplateBuild builds, ahead of the first box, the template of the VM a
// box of the manager gets: by default the one `boxlite run` gives (256 MiB,
// one vCPU, user networking). A VM sized by --memory (the container's limit
// plus 64 MiB) or given another network needs the matching flags; boxes of
// containerd's front doors (a tap per interface) build theirs on first use.
func runTemplateBuild(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "template build", "template build [--dir DIR] [--memory-mib M] [--vcpus N] [--network user|none]")
	dir := templateDirFlag(fs)
	mem := fs.Int("memory-mib", vmm.DefaultMemoryMiB, "the VM's memory in MiB")
	vcpus := fs.Int("vcpus", vmm.DefaultVCPUs, "the VM's virtual CPUs")
	network := fs.String("network", "user", "user or none, as boxlite run --network")
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("template build", "unexpected argument %q", fs.Arg(0))
	}
	scratch, err := os.MkdirTemp("", "bxt")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	share := filepath.Join(scratch, "share")
	if err := os.Mkdir(share, 0o700); err != nil {
		return err
	}
	cfg := vmm.Config{
		Share: share, StateDir: scratch, MemoryMiB: *mem, VCPUs: *vcpus,
		Templates: &vmm.Templates{Dir: *dir, Ready: agent.Probe},
	}
	switch *network {
	case "user":
		cfg.NICs = []vmm.NIC{{MAC: vmm.UserMAC, User: &vmm.UserNet{}}}
	case "none":
	default:
		return usageErrorf("template build", "--network %q: want user or none (boxes with a network namespace build theirs on first use)", *network)
	}
	began := time.Now()
	meta, err := vmm.BuildTemplate(ctx, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "%s\n", meta.Key)
	fmt.Fprintf(env.stderr, "template %s ready in %v (built in %v)\n", meta.Key, time.Since(began).Round(time.Millisecond), meta.BuildTime.Round(time.Millisecond))
	return nil
}
