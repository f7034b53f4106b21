// Command containerd-shim-boxlite-v1 is boxlite's containerd shim v2: one
// long-lived process per box, each box in its own microVM.
package main

import (
	"context"

	"github.com/containerd/containerd/v2/pkg/shim"

	boxshim "github.com/boxlite/boxlite/pkg/shim"
)

func main() {
	boxshim.Register()
	shim.RunShim(context.Background(), boxshim.NewManager("io.containerd.boxlite.v1"),
		func(c *shim.Config) {
			// pkg/reaper is the one owner of wait: the library's SIGCHLD
			// reaper would race it and steal exit statuses.
			c.NoReaper = true
			// pkg/shim logs to the bundle's log FIFO when someone reads
			// it, to shim.log otherwise, instead of blocking on it.
			c.NoSetupLogger = true
		})
}
