package client_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
)

// Run a command in a box through a daemon started with `boxlite serve`,
// print its output and exit status, and remove the box. (Compiled by go
// test; it needs a daemon to run, so it has no checked output. The
// integration tests drive the daemon through this client.)
func Example() {
	ctx := context.Background()
	c, err := client.New(client.DefaultURL, client.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	id, err := c.Create(ctx, api.CreateRequest{
		Rootfs: "/var/lib/boxlite/rootfs/busybox", // an absolute directory on the daemon's host
		Cmd:    []string{"sh", "-c", "echo hello from $(uname -r)"},
	})
	if err != nil {
		log.Fatal(err)
	}
	// Remove it however we leave; force kills it if it still runs.
	defer c.Remove(ctx, id, true)

	if err := c.Start(ctx, id); err != nil {
		log.Fatal(err)
	}
	// Attach relays the output from the process's start until it exits.
	exit, err := c.Attach(ctx, id, api.Stdio{Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("exit status", exit.Status)
}
