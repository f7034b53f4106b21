package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"
)

// runImage dispatches boxlite image pull|load|ls|rm.
func runImage(ctx context.Context, env *cliEnv, args []string) error {
	sub := map[string]func(context.Context, *cliEnv, []string) error{
		"pull": runImagePull, "load": runImageLoad, "ls": runImageLs, "rm": runImageRm,
	}
	if len(args) == 0 || sub[args[0]] == nil {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(env.stderr, "usage: boxlite image pull REF | load FILE.tar | ls | rm REF...")
			return nil
		}
		return usageErrorf("image", "want pull REF, load FILE.tar, ls or rm REF...")
	}
	return sub[args[0]](ctx, env, args[1:])
}

func runImagePull(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "image pull", "image pull REF")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageErrorf("image pull", "one image reference, please")
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	img, err := boxes.PullImage(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	fmt.Fprintln(env.stdout, img.Name)
	return nil
}

func runImageLoad(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "image load", "image load FILE.tar   (an OCI image layout or docker save tarball; - for stdin)")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageErrorf("image load", "one tarball, please")
	}
	f := env.stdin
	if name := fs.Arg(0); name != "-" {
		file, err := os.Open(name)
		if err != nil {
			return err
		}
		defer file.Close()
		f = file
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	imgs, err := boxes.LoadImages(ctx, f)
	if err != nil {
		return err
	}
	for _, img := range imgs {
		fmt.Fprintln(env.stdout, img.Name)
	}
	return nil
}

func runImageLs(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "image ls", "image ls [-q]")
	quiet := fs.Bool("q", false, "print the names only")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("image ls", "unexpected argument %q", fs.Arg(0))
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	imgs, err := boxes.ListImages(ctx)
	if err != nil {
		return err
	}
	if *quiet {
		for _, img := range imgs {
			fmt.Fprintln(env.stdout, img.Name)
		}
		return nil
	}
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tDIGEST\tSIZE\tLAYERS\tCREATED")
	for _, img := range imgs {
		created := "-"
		if !img.Created.IsZero() {
			created = img.Created.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\n", img.Name, shortDigest(img.Digest), humanSize(img.Size), img.Layers, created)
	}
	return w.Flush()
}

func runImageRm(ctx context.Context, env *cliEnv, args []string) error {
	fs := newFlagSet(env, "image rm", "image rm REF...")
	state := stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageErrorf("image rm", "no image given")
	}
	boxes, err := openBoxes(env, *state)
	if err != nil {
		return err
	}
	defer boxes.Close()
	failed := 0
	for _, ref := range fs.Args() {
		if err := boxes.RemoveImage(ctx, ref); err != nil {
			fmt.Fprintf(env.stderr, "boxlite: %v\n", err)
			failed++
			continue
		}
		fmt.Fprintln(env.stdout, ref)
	}
	if failed > 0 {
		return errReported
	}
	return nil
}

// shortDigest is sha256:<12 hex digits>.
func shortDigest(d string) string {
	algo, hex, ok := strings.Cut(d, ":")
	if !ok || len(hex) < 12 {
		return d
	}
	return algo + ":" + hex[:12]
}

// humanSize formats bytes in powers of 1024.
func humanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
