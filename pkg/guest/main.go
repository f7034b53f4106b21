package guest

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"time"

	runc "github.com/containerd/go-runc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/reaper"
)

const (
	// portName is the virtio-serial port the host talks to.
	portName = "agent"
	// portTimeout bounds the wait for the port to appear at boot.
	portTimeout = 10 * time.Second
	// drainTimeout bounds the wait for the last replies before a reboot.
	drainTimeout = 2 * time.Second
)

// Main is boxlite-agent: as PID 1 it boots the guest and serves the agent
// API until Shutdown. It never returns: if PID 1 exited the kernel would
// panic, so after Shutdown or a fatal error it syncs and reboots the guest
// (QEMU runs with -no-reboot, so the VM exits).
func Main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, errNotPID1)
		os.Exit(2)
	}
	if err := run(); err != nil {
		log.L.WithError(err).Error("boxlite-agent failed")
	}
	reboot()
}

// sealedRuntimeDir holds the read-only copy of the OCI runtime (sealBinary).
const sealedRuntimeDir = "/run/boxlite-runtime"

// run boots the guest and serves until Shutdown.
func run() error {
	ignoreSignals()
	if err := fixRoot(); err != nil {
		return err
	}
	if err := mountAll(); err != nil {
		return err
	}
	if err := openConsole(); err != nil {
		log.L.WithError(err).Warn("no console")
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	params := parseCmdline(string(cmdline))
	setupLogging(params.debug)
	log.L.WithField("t", sinceBoot().Round(time.Millisecond)).Debug("mounted")
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	enableControllers("/sys/fs/cgroup")
	if err := loopbackUp(); err != nil {
		log.L.WithError(err).Warn("loopback")
	}

	r := reaper.Default()
	runc.Monitor = &reaperMonitor{r: r}
	rt, err := FindRuntime(params.runtime)
	if err != nil {
		return err
	}
	if err := sealBinary(rt.Path, sealedRuntimeDir); err != nil {
		// The runtime then copies itself on each call: slower, as safe.
		log.L.WithError(err).Warn("runtime binary stays writable")
	}
	ctx := context.Background()
	port, err := findPort(ctx, "/sys/class/virtio-ports", portName, portTimeout)
	if err != nil {
		return err
	}
	log.L.WithField("t", sinceBoot().Round(time.Millisecond)).Debug("found port")
	agent, err := New(rt, r, WithBootTime(sinceBoot()), WithReseedRequired())
	if err != nil {
		return err
	}
	return serve(ctx, agent, port)
}

// serve serves the agent API on the port until Shutdown has finished and
// its reply is written.
func serve(ctx context.Context, agent *Agent, port string) error {
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(recoverPanics))
	if err != nil {
		return err
	}
	api.RegisterAgentService(srv, NewService(agent))
	l := newPortListener(port)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, l) }()
	log.L.WithField("runtime", agent.rt.Name).WithField("port", port).
		WithField("boot", agent.cfg.bootTime.Round(time.Millisecond)).Info("boxlite-agent serving")
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", port, err)
	case <-agent.Stopped():
	}
	if c := l.current(); c != nil {
		dctx, cancel := context.WithTimeout(ctx, drainTimeout)
		c.drain(dctx)
		cancel()
	}
	log.L.Info("boxlite-agent shutting down")
	return nil
}

// setupLogging logs short, uncoloured lines to the console (ttyS0): the
// guest clock to the millisecond, level, message and fields.
func setupLogging(debug bool) {
	log.L.Logger.SetFormatter(&logrus.TextFormatter{
		DisableColors:   true,
		FullTimestamp:   true,
		TimestampFormat: "15:04:05.000",
	})
	log.L.Logger.SetOutput(os.Stderr)
	if debug {
		_ = log.SetLevel("debug")
	}
}

// ignoreSignals keeps terminal and termination signals from killing PID 1.
// They are caught and dropped rather than set to SIG_IGN, which every child
// (the runtime, the containers) would inherit.
func ignoreSignals() {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGPIPE,
		unix.SIGUSR1, unix.SIGUSR2, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU)
	go func() {
		for sig := range ch {
			log.L.WithField("signal", sig).Debug("ignored signal")
		}
	}()
}

// sinceBoot is the time since the kernel started.
func sinceBoot() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// reboot syncs and reboots the guest; it does not return.
func reboot() {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
		log.L.WithError(err).Error("reboot")
	}
	select {}
}
