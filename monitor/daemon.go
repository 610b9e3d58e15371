package monitor

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/store"
	"golang.org/x/sys/unix"
)

// Daemon is a node's `cryo monitor`: it supervises every job submitted to
// its control socket, each as the user who submitted it.
type Daemon struct {
	Registry   Registry
	CRIU       criu.Binary
	CheckCache string
	Logger     *slog.Logger
	Metrics    *Metrics
	Health     HealthSource // GPU health for every job (nil: no GPUs)
	OnEvent    func(Event)
	// Linger is how long a finished job stays listed (default 10 min).
	Linger time.Duration

	ctx context.Context
	wg  sync.WaitGroup
}

// Serve runs the daemon on the control socket at path until ctx ends, then
// stops every job (checkpointing it first) and returns.
func (d *Daemon) Serve(ctx context.Context, path string) error {
	d.ctx = ctx
	if d.Logger == nil {
		d.Logger = slog.Default()
	}
	if d.Linger == 0 {
		d.Linger = 10 * time.Minute
	}
	d.Registry.Submit = d.submit
	err := d.Registry.Serve(ctx, path, d.Logger)
	d.wg.Wait()
	return err
}

func (d *Daemon) submit(name string, spec JobSpec, uid, gid int) error {
	if !filepath.IsAbs(spec.Store) {
		return fmt.Errorf("store must be an absolute path, got %q", spec.Store)
	}
	trees := spec.Trees
	for i := range trees {
		trees[i].UID, trees[i].GID = uid, gid
		if trees[i].Stdout == "" {
			trees[i].Stdout = filepath.Join(RunDir(spec.Store), trees[i].Name+".out")
		}
		if trees[i].Stderr == "" {
			trees[i].Stderr = filepath.Join(RunDir(spec.Store), trees[i].Name+".err")
		}
	}
	// Create the store and the output files as the user, so that a user
	// cannot make the daemon write where they may not.
	if err := asUser(uid, gid, func() error { return os.MkdirAll(spec.Store, 0o700) }); err != nil {
		return fmt.Errorf("as uid %d: %w", uid, err)
	}
	if _, err := store.Create(spec.Store, "cryo "+checkpoint.Version); err != nil {
		return err
	}
	if err := asUser(uid, gid, func() error {
		if err := os.MkdirAll(RunDir(spec.Store), 0o700); err != nil {
			return err
		}
		for _, t := range trees {
			for _, p := range []string{t.Stdout, t.Stderr} {
				f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
				if err != nil {
					return err
				}
				f.Close()
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("as uid %d: %w", uid, err)
	}
	sup, err := New(Config{
		Name: name, Store: spec.Store, Trees: trees, Interval: spec.Interval, MaxRestarts: spec.MaxRestarts,
		Keep: spec.Keep, Fresh: spec.Fresh, CRIU: d.CRIU, CheckCache: d.CheckCache,
		Logger: d.Logger, Metrics: d.Metrics, OnEvent: d.OnEvent, Health: d.Health,
	})
	if err != nil {
		return err
	}
	d.Registry.Add(sup, uid)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := context.WithCancel(context.WithoutCancel(d.ctx))
		defer cancel()
		go func() {
			// On daemon shutdown, checkpoint and stop the job.
			<-d.ctx.Done()
			sctx, c := context.WithTimeout(context.Background(), 5*time.Minute)
			defer c()
			if _, err := sup.Request(sctx, "stop"); err != nil {
				cancel()
			}
		}()
		code, err := sup.Run(ctx)
		d.Logger.Info("job ended", "job", name, "code", code, "err", err)
		select {
		case <-time.After(d.Linger):
		case <-d.ctx.Done():
		}
		d.Registry.Remove(name)
	}()
	return nil
}

// asUser runs fn with this thread's file-system identity set to uid/gid
// (setfsuid/setfsgid are per thread on Linux).
func asUser(uid, gid int, fn func() error) error {
	if uid == 0 {
		return fn()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	oldGid, _ := unix.SetfsgidRetGid(gid)
	oldUid, _ := unix.SetfsuidRetUid(uid)
	defer func() {
		unix.Setfsuid(oldUid)
		unix.Setfsgid(oldGid)
	}()
	return fn()
}
