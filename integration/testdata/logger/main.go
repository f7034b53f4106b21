// Command logger is a containerd binary:// logging driver for the
// integration tests. containerd's shims start it with the container's stdout
// as fd 3, stderr as fd 4 and a readiness pipe as fd 5, CONTAINER_ID and
// CONTAINER_NAMESPACE in its environment, and the URI's query as arguments
// (key then value, in any order). With "dir DIR" it writes DIR/stdout,
// DIR/stderr and DIR/env, and exits once both streams reached EOF.
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "logger:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	var dir string
	for i := 0; i+1 < len(args); i += 2 {
		if args[i] == "dir" {
			dir = args[i+1]
		}
	}
	if dir == "" {
		return fmt.Errorf("want the argument pair \"dir DIR\", got %q", args)
	}
	env := fmt.Sprintf("CONTAINER_ID=%s\nCONTAINER_NAMESPACE=%s\n", os.Getenv("CONTAINER_ID"), os.Getenv("CONTAINER_NAMESPACE"))
	if err := os.WriteFile(filepath.Join(dir, "env"), []byte(env), 0o644); err != nil {
		return err
	}
	streams := []struct {
		fd   uintptr
		name string
	}{{3, "stdout"}, {4, "stderr"}}
	var outs []*os.File
	for _, s := range streams {
		f, err := os.Create(filepath.Join(dir, s.name))
		if err != nil {
			return err
		}
		outs = append(outs, f)
	}
	// Ready: containerd waits for fd 5 to be closed.
	os.NewFile(5, "ready").Close()
	var wg sync.WaitGroup
	errs := make([]error, len(streams))
	for i, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = io.Copy(outs[i], os.NewFile(s.fd, s.name))
		}()
	}
	wg.Wait()
	for i, f := range outs {
		if err := f.Close(); err != nil && errs[i] == nil {
			errs[i] = err
		}
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
