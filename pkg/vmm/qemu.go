package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Timing bounds of the monitor's lifecycle.
const (
	// DefaultStartTimeout bounds Start when its ctx has no deadline.
	DefaultStartTimeout = 30 * time.Second
	// killReapTimeout bounds the wait for the reaper after SIGKILL.
	killReapTimeout = 5 * time.Second
	// drainGrace bounds the wait for the console's EOF after the monitor
	// was reaped (only a leaked descriptor could delay it).
	drainGrace = time.Second
	// exitAttributionGrace bounds the wait for the monitor's exit after a
	// failed QMP handshake, to report the exit rather than a socket error.
	exitAttributionGrace = 500 * time.Millisecond
	// startErrorLines is how much console an error from Start quotes.
	startErrorLines = 5
)

// vmState is where a VM is in its lifecycle:
// created → starting → running → exited, or created → exited when it is
// stopped before it starts, or starting → exited when the launch fails.
type vmState int

const (
	stateCreated vmState = iota
	stateStarting
	stateRunning
	stateExited
)

func (s vmState) String() string {
	return [...]string{"created", "starting", "running", "exited"}[s]
}

// errNotStarted is Wait's error for a VM that was stopped before it started.
var errNotStarted = classify(errdefs.ErrFailedPrecondition, errors.New("vm stopped before it started"))

// QEMU is a VM run by a qemu-system-x86_64 microvm child process.
type QEMU struct {
	// cfg is the validated configuration; read-only after NewQEMU.
	cfg Config
	// accel is the accelerator in use and reason why it was chosen.
	accel  Accel
	reason string
	// Paths of the files the VM keeps in cfg.StateDir.
	qmpPath, agentPath, pidPath, consolePath, rootPath string

	// launched is closed once Start has launched the monitor (proc and
	// console are set) or given up, or the VM was stopped before it started.
	launched chan struct{}
	// done is closed once the monitor has been reaped and its files
	// removed, or no monitor will ever run (exit or err is set first).
	done chan struct{}

	// mu guards the fields below.
	mu sync.Mutex
	// state is the lifecycle state. Guarded by mu.
	state vmState
	// stopping says a graceful Stop is under way. Guarded by mu.
	stopping bool
	// proc is the monitor process, nil until launched. Guarded by mu.
	proc *reaper.Process
	// console records the monitor's output, nil until launched. Guarded by mu.
	console *console
	// exit is the monitor's exit, valid once done is closed. Guarded by mu.
	exit reaper.Exit
	// oom counts host OOM kills in the monitor's memory cgroup; nil when
	// the host has none. Guarded by mu.
	oom *oomCounter
	// oomKilled says the host's OOM killer killed the monitor, valid once
	// done is closed. Guarded by mu.
	oomKilled bool
	// err is why no monitor ran, valid once done is closed. Guarded by mu.
	err error
	// tmpl is the template the VM was restored from; nil for a cold
	// boot. Set by Start before the launch.
	tmpl *template
	// cg is the monitor's own cgroup, nil when it runs in ours. Set by
	// launch; removed by watch once the monitor was reaped.
	cg *vmmCgroup
}

// NewQEMU validates cfg, fills its defaults and chooses the accelerator. It
// starts nothing.
func NewQEMU(cfg Config) (*QEMU, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	host := cfg.host
	if host == nil && cfg.Accel != AccelTCG {
		h := ProbeHost()
		host = &h
	}
	if host == nil {
		host = &Host{}
	}
	accel, reason, err := DetectAccel(cfg.Accel, *host)
	if err != nil {
		return nil, err
	}
	if cfg.Accel == AccelAuto && accel == AccelTCG {
		warnTCG(reason)
	}
	cfg.clockArgs = guestClockArgs(accel)
	dir := cfg.StateDir
	return &QEMU{
		cfg:         cfg,
		accel:       accel,
		reason:      reason,
		qmpPath:     filepath.Join(dir, QMPSocketName),
		agentPath:   filepath.Join(dir, AgentSocketName),
		pidPath:     filepath.Join(dir, PidFileName),
		consolePath: filepath.Join(dir, ConsoleLogName),
		rootPath:    filepath.Join(dir, RootDirName),
		launched:    make(chan struct{}),
		done:        make(chan struct{}),
	}, nil
}

// Accel returns the accelerator the VM runs under and why it was chosen.
func (q *QEMU) Accel() (Accel, string) { return q.accel, q.reason }

// AgentSocket is the host unix socket of the guest agent's virtio-serial
// port. It accepts connections as soon as Start returns.
func (q *QEMU) AgentSocket() string { return q.agentPath }

// Identity returns the monitor's pid and start time (zero before Start).
func (q *QEMU) Identity() reaper.Identity {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.proc == nil {
		return reaper.Identity{}
	}
	return q.proc.Identity()
}

// ConsoleTail returns up to the last n console lines, oldest first.
func (q *QEMU) ConsoleTail(n int) []string {
	q.mu.Lock()
	c := q.console
	q.mu.Unlock()
	if c == nil {
		return nil
	}
	return c.Tail(n)
}

// OOMKilled reports, once Done is closed, whether the host's OOM killer
// killed the monitor: it died of SIGKILL while the OOM-kill count of its
// memory cgroup (the one it was started in) went up.
func (q *QEMU) OOMKilled() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.oomKilled
}

func (q *QEMU) oomCounter() *oomCounter {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.oom
}

// Done is closed once the monitor has exited and been reaped, its pid file
// removed, or once it is known that no monitor will run.
func (q *QEMU) Done() <-chan struct{} { return q.done }

// Wait blocks until Done or ctx is done and returns the monitor's exit. A
// VM whose launch failed, or that was stopped before it started, returns
// an error instead.
func (q *QEMU) Wait(ctx context.Context) (reaper.Exit, error) {
	select {
	case <-q.done:
	case <-ctx.Done():
		return reaper.Exit{}, fmt.Errorf("wait for vm: %w", ctx.Err())
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.exit, q.err
}

// Start launches QEMU and returns once its QMP monitor has completed the
// capabilities handshake. ctx bounds the launch only (DefaultStartTimeout
// without a deadline); the VM outlives it. If anything fails after the
// launch, the monitor is killed and reaped before Start returns.
//
// QEMU gets Pdeathsig SIGKILL, which Linux ties to the thread that forked
// it: do not call Start from a goroutine that locked its OS thread and may
// exit with it locked.
func (q *QEMU) Start(ctx context.Context) error {
	if err := q.beginStart(); err != nil {
		return err
	}
	ctx, cancel := withDefaultDeadline(ctx, DefaultStartTimeout)
	defer cancel()
	q.useTemplate(ctx)
	proc, err := q.launch()
	if proc == nil {
		q.giveUp(err)
		return fmt.Errorf("start vm: %w", err)
	}
	if err == nil {
		err = q.handshake(ctx, proc)
	}
	if err == nil && q.tmpl != nil {
		err = q.restore(ctx)
	}
	if err != nil {
		if kerr := q.kill(proc); kerr != nil {
			err = fmt.Errorf("%w; %w", err, kerr)
		}
		return fmt.Errorf("start vm: %w%s", err, q.tailSuffix())
	}
	q.mu.Lock()
	if q.state == stateStarting {
		q.state = stateRunning
	}
	q.mu.Unlock()
	log.G(ctx).WithField("pid", proc.Pid()).WithField("accel", q.accel).Debug("vm started")
	return nil
}

// useTemplate makes the VM a clone of the template of its shape when
// templates are on, building the template first if there is none; without
// one it boots cold, saying why in one log line.
func (q *QEMU) useTemplate(ctx context.Context) {
	ts := q.cfg.Templates
	if ts == nil || q.cfg.template != nil {
		return
	}
	t, err := ts.ensure(ctx, &q.cfg, q.accel)
	if err != nil {
		log.G(ctx).WithError(err).Warn("no VM template: booting cold")
		return
	}
	q.cfg.template = &templateUse{role: roleClone,
		memory: filepath.Join(t.dir, templateMemory), state: filepath.Join(t.dir, templateState)}
	nics := make([]NIC, len(q.cfg.NICs))
	for i, n := range q.cfg.NICs {
		nics[i] = n
		nics[i].MAC = templateMAC(i)
	}
	q.cfg.NICs = nics
	q.tmpl = t
}

// Template is the key of the template the VM was restored from, "" when
// it booted cold. Valid once Start returned.
func (q *QEMU) Template() string {
	if q.tmpl == nil {
		return ""
	}
	return q.tmpl.meta.Key
}

// GuestMACs are the NICs' addresses as the guest finds them: a clone has
// its template's until its agent sets the box's own. Valid once Start
// returned.
func (q *QEMU) GuestMACs() []net.HardwareAddr {
	macs := make([]net.HardwareAddr, len(q.cfg.NICs))
	for i, n := range q.cfg.NICs {
		macs[i] = n.MAC
	}
	return macs
}

// DiscardTemplate removes the template the VM was restored from, when the
// restored guest turned out broken: the next box builds it again.
func (q *QEMU) DiscardTemplate() {
	if q.tmpl == nil {
		return
	}
	if err := RemoveTemplate(q.cfg.Templates.Dir, q.tmpl.meta.Key); err != nil {
		log.L.WithError(err).WithField("template", q.tmpl.meta.Key).Warn("remove VM template")
	}
}

// beginStart moves created → starting.
func (q *QEMU) beginStart() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.state != stateCreated {
		return classify(errdefs.ErrFailedPrecondition, fmt.Errorf("cannot start vm in %s state", q.state))
	}
	q.state = stateStarting
	return nil
}

// giveUp records that no monitor runs after a failed launch.
func (q *QEMU) giveUp(err error) {
	q.mu.Lock()
	q.state = stateExited
	q.err = err
	q.mu.Unlock()
	close(q.launched)
	close(q.done)
}

// tailSuffix quotes the last console lines for an error message.
func (q *QEMU) tailSuffix() string {
	lines := q.ConsoleTail(startErrorLines)
	if len(lines) == 0 {
		return ""
	}
	return " (console: " + strings.Join(lines, " | ") + ")"
}

// launch starts the monitor. A nil process means nothing was started (and
// nothing is left behind); a process with an error must be killed.
func (q *QEMU) launch() (*reaper.Process, error) {
	if err := checkNoLiveMonitor(q.pidPath); err != nil {
		return nil, err
	}
	var undo undoStack
	defer undo.run()
	cons, err := newConsole(q.consolePath, q.cfg.ConsoleLogMax)
	if err != nil {
		return nil, fmt.Errorf("console log: %w", err)
	}
	undo.add(cons.close)
	qmpL, err := listenUnix(q.qmpPath)
	if err != nil {
		return nil, err
	}
	defer qmpL.Close()
	undo.add(func() { os.Remove(q.qmpPath) })
	agentL, err := listenUnix(q.agentPath)
	if err != nil {
		return nil, err
	}
	defer agentL.Close()
	undo.add(func() { os.Remove(q.agentPath) })
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	undo.add(func() { r.Close() })
	if err := makeRoot(q.rootPath); err != nil {
		return nil, err
	}
	undo.add(func() { removeRoot(q.rootPath) })

	cg, err := q.makeCgroup()
	if err != nil {
		return nil, err
	}
	if cg != nil {
		undo.add(func() { cg.remove(); os.Remove(filepath.Join(q.cfg.StateDir, CgroupFileName)) })
	}

	fds := assignFDs(q.cfg.NICs)
	extra := []*os.File{qmpL, agentL}
	for _, n := range q.cfg.NICs {
		if n.User == nil {
			extra = append(extra, n.Tap)
		}
	}
	cmd := exec.Command(q.cfg.QEMUBinary, append(qemuArgs(&q.cfg, q.accel, fds), "-chroot", q.rootPath)...)
	cmd.Dir = q.cfg.StateDir
	cmd.Stdout, cmd.Stderr = w, w
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if cg != nil {
		// On cgroup v2 the monitor is born in its cgroup.
		dir, err := cg.openDir()
		if err != nil {
			return nil, err
		}
		if dir != nil {
			defer dir.Close()
			cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(dir.Fd())
		}
	}
	// Count the OOM kills of the monitor's memory cgroup from before it
	// can allocate anything: its own, or else ours, where it starts.
	oom, oerr := q.newOOMCounter(cg)
	if oerr != nil {
		log.L.WithError(oerr).Debug("no host OOM counter: a host OOM kill of the vmm reads as a plain SIGKILL")
	}
	proc, serr := startIn(q.cfg.NetNS, func() (*reaper.Process, error) { return reaper.Default().Start(cmd) })
	if proc == nil {
		return nil, fmt.Errorf("launch %s: %w", q.cfg.QEMUBinary, serr)
	}
	undo.release()
	// Written before watch starts, so watch's removal cannot come first.
	err = reaper.WritePidFile(q.pidPath, proc.Identity())
	if err != nil {
		err = fmt.Errorf("pid file: %w", err)
	}
	if cg != nil && !cmd.SysProcAttr.UseCgroupFD {
		// cgroup v1: moved in right after the start.
		if aerr := cg.add(proc.Pid()); aerr != nil {
			err = errors.Join(err, fmt.Errorf("move vmm into its cgroup: %w", aerr))
		}
	}
	q.mu.Lock()
	q.proc, q.console, q.oom, q.cg = proc, cons, oom, cg
	q.mu.Unlock()
	close(q.launched)
	go q.watch(proc, r, cons)
	go followCgroup(proc, oom)
	// A monitor started on a thread that could not leave its network
	// namespace, or left outside its cgroup, is killed by the caller.
	return proc, errors.Join(serr, err)
}

// makeCgroup creates the monitor's own cgroup when the config asks for one
// and records it in the state dir. A host without the controllers gets a
// warning and an unconfined monitor; any other failure fails the launch.
func (q *QEMU) makeCgroup() (*vmmCgroup, error) {
	if q.cfg.Cgroup == "" {
		return nil, nil
	}
	cg, err := newVMMCgroup(q.cfg.Cgroup, vmmMemoryLimit(q.cfg.MemoryMiB, q.accel), vmmPidsLimit(q.cfg.VCPUs))
	if errors.Is(err, errNoCgroupControllers) {
		log.L.WithError(err).Warn("the vmm runs without a cgroup of its own")
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if err := cg.record(filepath.Join(q.cfg.StateDir, CgroupFileName)); err != nil {
		cg.remove()
		return nil, fmt.Errorf("record vmm cgroup: %w", err)
	}
	return cg, nil
}

// newOOMCounter counts the OOM kills of the monitor's cgroup cg, or of
// ours without one.
func (q *QEMU) newOOMCounter(cg *vmmCgroup) (*oomCounter, error) {
	if cg != nil {
		return newOOMCounterAt(cg.eventsPath)
	}
	return newOOMCounter(os.Getpid())
}

// cgroupFollowInterval is how often a running monitor's cgroup is checked
// for a move (followCgroup).
var cgroupFollowInterval = time.Second

// followCgroup watches, while the monitor runs, for it being moved to
// another memory cgroup (systemd reorganising its slices does that), and
// makes the OOM counter count there too: the kernel counts an OOM kill in
// the victim's cgroup at the time. A kill within a second of a move can
// still read as a plain SIGKILL.
func followCgroup(proc *reaper.Process, oom *oomCounter) {
	if oom == nil {
		return
	}
	t := time.NewTicker(cgroupFollowInterval)
	defer t.Stop()
	for {
		select {
		case <-proc.Done():
			return
		case <-t.C:
			if moved, path := oom.follow(proc.Pid()); moved {
				log.L.WithField("pid", proc.Pid()).WithField("cgroup", filepath.Dir(path)).
					Warn("vmm was moved to another cgroup: host OOM detection follows it")
			}
		}
	}
}

// checkNoLiveMonitor refuses to reuse a state dir whose pid file names a
// running process.
func checkNoLiveMonitor(pidPath string) error {
	id, err := reaper.ReadPidFile(pidPath)
	if err != nil {
		return nil
	}
	if running, _ := id.Running(); running {
		return classify(errdefs.ErrAlreadyExists,
			fmt.Errorf("%s names running vmm pid %d: kill it or use another state dir", pidPath, id.Pid))
	}
	return nil
}

// handshake waits until QMP answers, bounded by ctx and by the monitor's
// exit.
func (q *QEMU) handshake(ctx context.Context, proc *reaper.Process) error {
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-proc.Done():
			cancel()
		case <-hctx.Done():
		}
	}()
	c, err := dialQMP(hctx, q.qmpPath)
	if err == nil {
		return c.Close()
	}
	// QEMU closing the socket usually means it is exiting: unless ctx
	// ran out, give the reaper a moment so the error can say how it exited.
	grace := exitAttributionGrace
	if ctx.Err() != nil {
		grace = 0
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-proc.Done():
		e, _ := proc.Exit()
		return fmt.Errorf("qemu exited during start: %v", e)
	case <-t.C:
		return err
	}
}

// watch waits for the monitor's exit, lets the console drain, removes the
// pid file and sockets, and closes done.
func (q *QEMU) watch(proc *reaper.Process, out *os.File, cons *console) {
	drained := make(chan struct{})
	go func() {
		cons.drain(out)
		close(drained)
	}()
	<-proc.Done()
	exit, _ := proc.Exit()
	t := time.NewTimer(drainGrace)
	select {
	case <-drained:
	case <-t.C:
		log.L.WithField("pid", exit.Pid).Warn("vmm console still open after exit: closing it")
	}
	t.Stop()
	out.Close()
	<-drained
	if id, err := reaper.ReadPidFile(q.pidPath); err == nil && id == proc.Identity() {
		os.Remove(q.pidPath)
	}
	os.Remove(q.qmpPath)
	os.Remove(q.agentPath)
	if err := removeRoot(q.rootPath); err != nil {
		log.L.WithError(err).WithField("pid", exit.Pid).Warn("remove vmm root")
	}
	oomKilled := exit.Signal == syscall.SIGKILL && q.oomCounter().increased()
	if oomKilled {
		log.L.WithField("pid", exit.Pid).Warn("vmm was killed by the host's OOM killer")
	}
	// The cgroup goes after its OOM count was read.
	q.mu.Lock()
	cg := q.cg
	q.mu.Unlock()
	if cg != nil {
		if err := cg.remove(); err != nil {
			log.L.WithError(err).WithField("pid", exit.Pid).Warn("remove vmm cgroup")
		} else {
			os.Remove(filepath.Join(q.cfg.StateDir, CgroupFileName))
		}
	}
	q.mu.Lock()
	q.state = stateExited
	q.exit = exit
	q.oomKilled = oomKilled
	q.mu.Unlock()
	close(q.done)
}

// withDefaultDeadline bounds ctx by d unless it already has a deadline.
func withDefaultDeadline(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// undoStack runs cleanups in reverse order unless released.
type undoStack struct{ fns []func() }

func (u *undoStack) add(fn func()) { u.fns = append(u.fns, fn) }
func (u *undoStack) release()      { u.fns = nil }
func (u *undoStack) run() {
	for i := len(u.fns) - 1; i >= 0; i-- {
		u.fns[i]()
	}
	u.fns = nil
}
