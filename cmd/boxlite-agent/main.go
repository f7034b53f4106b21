// Command boxlite-agent is PID 1 of a boxlite microVM: it boots the guest and
// serves the agent API to the host over the virtio-serial port "agent".
package main

import "github.com/boxlite/boxlite/pkg/guest"

func main() {
	guest.Main()
}
