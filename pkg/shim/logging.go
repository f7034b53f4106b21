package shim

import (
	"context"
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
)

// logFileName receives the shim's log when nobody reads the log FIFO.
const logFileName = "shim.log"

// setupLogging points the long-lived shim's log at the "log" FIFO in its
// bundle when containerd (or the manager) created one and reads it, and at
// shim.log in the bundle otherwise. The library's own setup (off:
// shim.Config.NoSetupLogger) would block forever on a FIFO nobody reads, or
// exit when there is none.
func setupLogging(ctx context.Context) {
	if opts, ok := ctx.Value(shim.OptsKey{}).(shim.Opts); ok && opts.Debug {
		_ = log.SetLevel("debug")
	}
	_ = log.SetFormat(log.TextFormat)
	var w io.Writer
	if st, err := os.Stat("log"); err == nil && st.Mode()&os.ModeNamedPipe != 0 {
		octx, cancel := context.WithTimeout(ctx, 5*time.Second)
		f, err := fifo.OpenFifoDup2(octx, "log", syscall.O_WRONLY, 0o700, int(os.Stderr.Fd()))
		cancel()
		if err == nil {
			w = f
		}
	}
	if w == nil {
		f, err := os.OpenFile(logFileName, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return
		}
		if f != nil {
			w = f
		}
	}
	if w != nil {
		log.L.Logger.SetOutput(w)
	}
}
