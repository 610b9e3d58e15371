package monitor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/jobns"
	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/restore"
)

// Engine carries out what the supervisor decides: it starts, checkpoints,
// restores and ends the job, and lists and removes generations. The
// supervisor calls it from one goroutine, one call at a time. The real one
// uses CRIU through the checkpoint and restore packages; tests inject
// their own to check the supervisor's decisions without CRIU.
type Engine interface {
	// Start launches job-init with the job's trees afresh and returns its
	// PID; events is the file job-init appends its events to.
	Start(ctx context.Context, events string) (int, error)
	// Checkpoint checkpoints the job rooted at pid (with kill, stopping it
	// once committed). accept is called before the commit and may refuse
	// the generation (checkpoint.Options.Accept).
	Checkpoint(ctx context.Context, pid int, kill bool, accept func(checkpoint.Dumped) error) (*checkpoint.Result, error)
	// Restore restores generation gen as the supervisor's child.
	Restore(ctx context.Context, gen int) (*Restored, error)
	// Terminate ends every process of the job and reaps them.
	Terminate(j JobProcs) error
	// Generations lists the committed generations, oldest first.
	Generations() ([]Generation, error)
	// Remove removes generations (retention) and collects their chunks.
	Remove(gens []int) error
}

// Restored is a job brought back from a generation.
type Restored struct {
	PID       int             // job-init
	RootPID   int             // as checkpointed (the same PID)
	Processes []store.Process // as checkpointed
	// Cuts are the output files cut back to the checkpoint, and CutError
	// says which could not be.
	Cuts     []outputs.Cut
	CutError string
	// Took is how long the restore took, all of it: the store read and
	// checked, CRIU, the GPU state.
	Took time.Duration
}

// criuEngine is the real Engine.
type criuEngine struct {
	cfg *Config
	log *slog.Logger
}

func (e *criuEngine) Start(ctx context.Context, events string) (int, error) {
	run := e.cfg.jobDir()
	spec := InitSpec{Trees: append([]TreeSpec(nil), e.cfg.Trees...), Events: events, Grace: e.cfg.Grace}
	if e.cfg.HeartbeatTimeout > 0 {
		hb := filepath.Join(run, "heartbeat")
		for i := range spec.Trees {
			spec.Trees[i].Env = append(envOrSelf(spec.Trees[i].Env), "CRYO_HEARTBEAT_FILE="+hb)
		}
		// Created if missing, never truncated, never through a link.
		if f, err := os.OpenFile(hb, os.O_WRONLY|os.O_CREATE|syscall.O_NOFOLLOW, 0o600); err == nil {
			f.Close()
		}
	}
	if e.cfg.Namespaces {
		// The job's TMPDIR: a tmpfs of its own mounted here inside its
		// namespaces (the directory stays empty outside), which every
		// checkpoint holds and every restore brings back.
		tmp := filepath.Join(run, "tmp")
		if err := os.Mkdir(tmp, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return 0, err
		}
		spec.Namespaced, spec.TmpDir, spec.Log = true, tmp, filepath.Join(run, "init.log")
		for i := range spec.Trees {
			spec.Trees[i].Env = append(envOrSelf(spec.Trees[i].Env), "TMPDIR="+tmp)
		}
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(filepath.Join(run, "init.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	env := append(os.Environ(), InitEnv+"="+string(b))
	// job-init dies with its supervisor (and, as PID 1 of its namespaces, the
	// whole job with it): a job never runs unsupervised, and a node that
	// received a migrated job leaves nothing running when it dies before
	// the source let go. CRIU keeps the setting in its images.
	attr, self := &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}, e.cfg.Self
	if spec.Namespaced {
		attr = jobns.Attr(*attr, !privilege.Root())
		// By its path, looked up inside the job's mount namespace: a magic
		// link such as /proc/self/exe would give job-init an executable on
		// a mount of the node's namespace, which CRIU cannot place in the
		// job's.
		if self == "/proc/self/exe" {
			if self, err = os.Executable(); err != nil {
				return 0, fmt.Errorf("start job-init: %w", err)
			}
		}
	}
	// syscall.ForkExec rather than os/exec: job-init must be a plain
	// child waited for by PID, the same way after a restore.
	pid, err := syscall.ForkExec(self, []string{"cryo", "job-init"}, &syscall.ProcAttr{
		Env:   env,
		Files: []uintptr{devnull.Fd(), logf.Fd(), logf.Fd()},
		Sys:   attr,
	})
	if err != nil {
		return 0, fmt.Errorf("start job-init: %w", err)
	}
	return pid, nil
}

func envOrSelf(env []string) []string {
	if env == nil {
		return os.Environ()
	}
	return env
}

func (e *criuEngine) Checkpoint(ctx context.Context, pid int, kill bool, accept func(checkpoint.Dumped) error) (*checkpoint.Result, error) {
	// Retention is the supervisor's (retain): Keep 0 here.
	return checkpoint.Take(ctx, checkpoint.Options{
		Store: e.cfg.Store, PID: pid, Kill: kill, CRIU: e.cfg.CRIU, WorkDir: e.cfg.WorkDir,
		CheckCache: e.cfg.CheckCache, Logger: e.log, Reap: true, Replica: e.cfg.Replica, Accept: accept, Offload: e.cfg.Offload,
		GhostLimit: e.cfg.GhostLimit, CRIUConfig: e.cfg.CRIUConfig, PackSize: e.cfg.PackSize,
	})
}

func (e *criuEngine) Restore(ctx context.Context, gen int) (*Restored, error) {
	t0 := time.Now()
	// A namespaced job's TMPDIR mount needs its mountpoint (a store copied
	// or made on another node may lack the empty directory).
	if err := os.Mkdir(filepath.Join(e.cfg.jobDir(), "tmp"), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	res, err := restore.Restore(ctx, restore.Options{
		Store: e.cfg.Store, Generation: gen, CRIU: e.cfg.CRIU, Sibling: true, Replica: e.cfg.Replica,
		WorkDir: e.cfg.WorkDir, CheckCache: e.cfg.CheckCache, Logger: e.log, TruncateOutputs: true, Offload: e.cfg.Offload,
		CRIUConfig: e.cfg.CRIUConfig,
	})
	if err != nil {
		return nil, err
	}
	out := &Restored{PID: res.PID, Cuts: res.Truncated, CutError: res.TruncateError, Took: time.Since(t0)}
	if st, err := store.Open(e.cfg.Store); err == nil {
		if m, err := st.ReadManifest(gen); err == nil {
			out.RootPID, out.Processes = m.Job.RootPID, m.Job.Processes
		}
	}
	return out, nil
}

func (e *criuEngine) Terminate(j JobProcs) error { return endJob(j, 10*time.Second) }

func (e *criuEngine) Generations() ([]Generation, error) {
	st, err := store.Open(e.cfg.Store)
	if err != nil {
		return nil, err
	}
	ns, err := st.Generations()
	if err != nil {
		return nil, err
	}
	var out []Generation
	for _, n := range ns {
		g := Generation{N: n}
		if m, err := st.ReadManifest(n); err == nil {
			g.Began = m.Created.Add(-time.Duration(m.Stats.DurableMS) * time.Millisecond)
			for _, p := range m.Job.Processes {
				g.PIDs = append(g.PIDs, p.PID)
			}
		}
		out = append(out, g)
	}
	return out, nil
}

func (e *criuEngine) Remove(gens []int) error {
	if len(gens) == 0 {
		return nil
	}
	st, err := store.Open(e.cfg.Store)
	if err != nil {
		return err
	}
	st.PackLimit = e.cfg.PackSize
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	unlock, err := st.Lock(ctx, true)
	if err != nil {
		return err
	}
	defer unlock()
	for _, g := range gens {
		if err := st.Remove(g); err != nil {
			return err
		}
	}
	_, err = st.GC()
	return err
}
