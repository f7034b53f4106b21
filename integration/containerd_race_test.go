package integration

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// raceRounds is how many rounds of concurrent exec, kill and delete one
// task takes.
const raceRounds = 50

// raceOpTimeout bounds each call of a round: a call that takes longer is a
// deadlock.
const raceOpTimeout = 90 * time.Second

// TestContainerdConcurrentKillDeleteExecOnOneTask hammers one box with
// exec, kill and delete at once (fault matrix row 11): each round starts an
// exec while the task is signalled (SIGUSR1, ignored by the init) and the
// previous round's exec is killed and deleted; the last round kills and
// deletes the task itself while an exec starts. Every call returns within
// its bound (no deadlock), fails only with the errors its race allows
// (never an internal one), the shim never dies, and the harness's leak
// checks find nothing left. Verified two-sided: before the agent reported
// an exec that raced its init's death as FailedPrecondition, the last
// round's exec failed with Unknown ("crun exec: fail startup").
func TestContainerdConcurrentKillDeleteExecOnOneTask(t *testing.T) {
	c := startContainerd(t)
	id := c.newID(t, "bx")
	ctx := nsCtx(context.Background())
	ctr := c.newContainer(t, id, boxliteRuntime, nil, "sh", "-c", "trap '' USR1; echo ready; exec sleep 100000")
	defer ctr.Delete(ctx, client.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	shim := c.shimOf(t, id)
	pspec := &specs.Process{Args: []string{"sleep", "30"}, Cwd: "/", Env: []string{"PATH=/bin:/usr/bin"}}
	// allowed says err is one a race of these calls may give.
	allowed := func(err error) bool {
		return err == nil || errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err) || errdefs.IsAlreadyExists(err)
	}
	call := func(what string, fn func(ctx context.Context) error) error {
		cctx, cancel := context.WithTimeout(ctx, raceOpTimeout)
		defer cancel()
		err := fn(cctx)
		if errors.Is(err, context.DeadlineExceeded) || errdefs.IsDeadlineExceeded(err) {
			return fmt.Errorf("%s did not return within %v (deadlock?): %w", what, raceOpTimeout, err)
		}
		if !allowed(err) {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
	var prev client.Process
	for round := range raceRounds {
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		var started client.Process
		wg.Add(3)
		go func() {
			defer wg.Done()
			errs <- call("exec", func(ctx context.Context) error {
				p, err := task.Exec(ctx, fmt.Sprintf("e%d", round), pspec, cio.NullIO)
				if err != nil {
					return err
				}
				started = p
				return p.Start(ctx)
			})
		}()
		go func() {
			defer wg.Done()
			errs <- call("kill the task", func(ctx context.Context) error { return task.Kill(ctx, syscall.SIGUSR1) })
		}()
		go func(p client.Process) {
			defer wg.Done()
			if p == nil {
				return
			}
			errs <- call("kill and delete the last exec", func(ctx context.Context) error {
				if err := p.Kill(ctx, syscall.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
					return err
				}
				_, err := p.Delete(ctx, client.WithProcessKill)
				return err
			})
		}(prev)
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		prev = started
		if err := syscall.Kill(shim, 0); err != nil {
			t.Fatalf("round %d: the shim (pid %d) died", round, shim)
		}
	}
	// The last round: the task itself goes while an exec starts.
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	wg.Add(3)
	go func() {
		defer wg.Done()
		errs <- call("exec", func(ctx context.Context) error {
			p, err := task.Exec(ctx, "last", pspec, cio.NullIO)
			if err != nil {
				return err
			}
			return p.Start(ctx)
		})
	}()
	go func() {
		defer wg.Done()
		errs <- call("SIGKILL the task", func(ctx context.Context) error { return task.Kill(ctx, syscall.SIGKILL, client.WithKillAll) })
	}()
	go func() {
		defer wg.Done()
		errs <- call("delete the task", func(ctx context.Context) error {
			_, err := task.Delete(ctx, client.WithProcessKill)
			return err
		})
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	// Whatever the race left, a forced delete ends the task.
	if err := call("final delete", func(ctx context.Context) error {
		_, err := task.Delete(ctx, client.WithProcessKill)
		return err
	}); err != nil {
		t.Error(err)
	}
	waitFor(t, time.Minute, "task "+id+" gone", func() bool {
		_, ok := c.taskList(t)[id]
		return !ok
	})
}
