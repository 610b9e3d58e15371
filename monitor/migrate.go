package monitor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/wire"
	"github.com/cryo-hpc/cryo/migrate"
	"github.com/cryo-hpc/cryo/restore"
)

// StateMigrated: the job moved to another node; a later `cryo run` on the
// store starts afresh, as after StateCompleted.
const StateMigrated State = "migrated"

// MigrateRequest asks the supervisor to move the job to another node,
// where `cryo run --receive` listens.
type MigrateRequest struct {
	To        string `json:"to"`  // host:port
	Key       string `json:"key"` // the pre-shared key file both sides hold
	MaxRounds int    `json:"max_rounds,omitempty"`
	// NoPrecopy stops the job at once and copies all of it (stop and
	// copy), as a baseline for the pre-copy rounds.
	NoPrecopy bool `json:"no_precopy,omitempty"`
}

// migrator is an Engine that can stop and dump a job for a migration, and
// restore one that migrated here from its images.
type migrator interface {
	Hold(ctx context.Context, pid int, sink pageserver.Sink) (*checkpoint.Held, error)
	RestoreImages(ctx context.Context, src criu.ImageSource, m *store.Manifest) (*Restored, error)
}

// RestoreImages restores a job migrated here from its images as src
// serves them (not yet a generation of the store), as the supervisor's
// child.
func (e *criuEngine) RestoreImages(ctx context.Context, src criu.ImageSource, m *store.Manifest) (*Restored, error) {
	if err := os.Mkdir(filepath.Join(e.cfg.jobDir(), "tmp"), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	res, err := restore.Restore(ctx, restore.Options{
		Store: e.cfg.Store, Source: src, Manifest: m, CRIU: e.cfg.CRIU, Sibling: true,
		WorkDir: e.cfg.WorkDir, CheckCache: e.cfg.CheckCache, Logger: e.log, TruncateOutputs: true, Offload: e.cfg.Offload,
		CRIUConfig: e.cfg.CRIUConfig,
	})
	if err != nil {
		return nil, err
	}
	return &Restored{PID: res.PID, RootPID: m.Job.RootPID, Processes: m.Job.Processes, Cuts: res.Truncated, CutError: res.TruncateError}, nil
}

// Hold dumps the job rooted at pid, its pages to sink, and leaves it
// stopped (checkpoint.Hold with the job's options).
func (e *criuEngine) Hold(ctx context.Context, pid int, sink pageserver.Sink) (*checkpoint.Held, error) {
	return checkpoint.Hold(ctx, checkpoint.Options{
		Store: e.cfg.Store, PID: pid, CRIU: e.cfg.CRIU, WorkDir: e.cfg.WorkDir, CheckCache: e.cfg.CheckCache,
		Logger: e.log, Offload: e.cfg.Offload, GhostLimit: e.cfg.GhostLimit, CRIUConfig: e.cfg.CRIUConfig,
	}, sink)
}

// Migrate moves the job to another node. It returns once the job runs
// there (and its copy here is gone: Run then returns 0), or with an error
// when it continues here.
func (s *Supervisor) Migrate(ctx context.Context, req MigrateRequest) (*migrate.Result, error) {
	rep, err := s.ask(ctx, request{op: "migrate", mig: &req})
	if err != nil {
		return nil, err
	}
	return rep.mig, rep.err
}

// migrate carries out a MigrateRequest from the loop. done says the job
// is gone from here.
func (s *Supervisor) migrate(ctx context.Context, req MigrateRequest) (res *migrate.Result, done bool, err error) {
	defer func() {
		if err != nil && !errors.Is(err, migrate.ErrRolledBack) {
			err = fmt.Errorf("%w; %w", err, migrate.ErrRolledBack)
		}
	}()
	m, ok := s.eng.(migrator)
	switch {
	case !ok:
		return nil, false, errors.New("this supervisor cannot migrate jobs")
	case s.initPID == 0:
		return nil, false, errors.New("the job is not running here (swapped out?)")
	case !s.cfg.Namespaces:
		return nil, false, errors.New("the job runs without namespaces of its own, so its PIDs could collide at the destination: start it with --namespaces on")
	case req.To == "" || req.Key == "":
		return nil, false, errors.New("a migration needs a destination and a key file")
	}
	key, err := wire.LoadKey(req.Key)
	if err != nil {
		return nil, false, err
	}
	if sb := s.cfg.Standby; sb != nil && s.standby != nil && sb.Addr == req.To {
		// The job moves to its standby, which holds its generations: the
		// stream ends so that the standby takes the migration, and starts
		// again if the migration fails.
		s.standby.Close("migrating")
		s.standby = nil
		defer func() {
			if !done {
				if _, serr := s.startStandby(ctx, sb); serr != nil {
					s.event("standby-failed", serr.Error(), 0)
				}
			}
		}()
	}
	job, err := json.Marshal(jobDef{Trees: s.cfg.Trees, JobDir: s.cfg.jobDir()})
	if err != nil {
		return nil, false, err
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	c, err := wire.Dial(dctx, req.To, key)
	cancel()
	if err != nil {
		return nil, false, fmt.Errorf("migrate to %s: %w", req.To, err)
	}
	defer c.Close()
	s.event("migrating", "to "+req.To, 0)
	init := s.initPID
	res, err = migrate.Send(ctx, c, migrate.SendOptions{
		Job: job, MaxRounds: req.MaxRounds, NoPrecopy: req.NoPrecopy, Logger: s.log,
		Store: s.cfg.Store, Base: migrate.NewestBase(s.cfg.Store),
		Procs: func() ([]migrate.Proc, error) { return jobProcs(init) },
		Hold: func(ctx context.Context, sink pageserver.Sink) (*checkpoint.Held, error) {
			return m.Hold(ctx, init, sink)
		},
		Stopped: func() {
			s.event("migration-stopped", "the job is stopped and dumped; the rest of it goes to "+req.To, 0)
		},
	})
	if err != nil {
		if errors.Is(err, migrate.ErrRolledBack) {
			// The job ran on at the destination for a while, perhaps:
			// what the detectors saw since means nothing.
			s.afterMigrateBack()
		}
		s.event("migrate-failed", fmt.Sprintf("to %s: %v", req.To, err), 0)
		return res, false, fmt.Errorf("migrate to %s: %w", req.To, err)
	}
	// Held.Kill reaped job-init, our child.
	s.initPID = 0
	s.setExit(StateMigrated, 0)
	s.event("migrated", fmt.Sprintf("to %s: generation %d there; down %s, %d rounds, %s sent for %s of memory",
		req.To, res.Generation, res.Downtime.Round(time.Millisecond), len(res.Rounds), humanBytes(res.Sent), humanBytes(res.JobBytes)), 0)
	return res, true, nil
}

// startStandby starts keeping a standby node up to date; stop tells it
// why the job is over here (so that it does not take the job over), from
// Run's outcome.
func (s *Supervisor) startStandby(ctx context.Context, sb *StandbyConfig) (func(int, error), error) {
	key, err := wire.LoadKey(sb.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("--standby: %w", err)
	}
	job, err := json.Marshal(jobDef{Trees: s.cfg.Trees, JobDir: s.cfg.jobDir()})
	if err != nil {
		return nil, err
	}
	s.standby = migrate.StartStandby(context.WithoutCancel(ctx), migrate.StandbyOptions{
		Addr: sb.Addr, Key: key, Store: s.cfg.Store, Job: job, Logger: s.log,
		Report: func(kind, detail string, gen int) {
			// From the standby's goroutine: reported, touching no
			// supervisor state.
			e := Event{Time: time.Now(), Job: s.cfg.Name, Kind: kind, Detail: detail, Gen: gen}
			s.log.Debug(e.Kind, "detail", e.Detail, "generation", e.Gen)
			if s.cfg.OnEvent != nil {
				s.cfg.OnEvent(e)
			}
		},
	})
	return func(code int, err error) {
		s.mu.Lock()
		st := s.status.State
		s.mu.Unlock()
		reason := string(st)
		if err != nil && st != StateStopped && st != StateMigrated {
			// A supervisor that fails hands the job to nobody: the
			// standby takes it over only from a node gone silent.
			reason = "failed"
		}
		if s.standby != nil {
			s.standby.Close(reason)
		}
	}, nil
}

// afterMigrateBack resets what the detectors knew of a job that was held
// stopped and resumed.
func (s *Supervisor) afterMigrateBack() {
	s.beat.reset(s.beat.path, time.Now())
	s.hang = map[string]hangMark{}
}

// jobProcs lists the processes of the job rooted at init (job-init, PID 1
// of the job's namespace) with their PIDs in that namespace.
func jobProcs(init int) ([]migrate.Proc, error) {
	pids, err := proc.Tree(init)
	if err != nil {
		return nil, err
	}
	var out []migrate.Proc
	for _, p := range pids {
		ns, err := proc.NSpid(p)
		if err != nil || len(ns) < 2 {
			continue // gone, or not in the job's namespace
		}
		out = append(out, migrate.Proc{PID: p, JobPID: ns[len(ns)-1]})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no process of the job below pid %d", init)
	}
	return out, nil
}

func humanBytes(n int64) string {
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// Adopt is how a node that received a migrated job (`cryo run --receive`)
// runs it: the store's newest generation is the job, restored as if the
// run were resumed; watch reports to the source when it runs and whether
// it lived through grace.
type Adopt struct {
	In    *migrate.Incoming
	Grace time.Duration
}

// jobDef is what a source tells the destination of the job besides its
// images: its trees, and where its own files are.
type jobDef struct {
	Trees  []TreeSpec `json:"trees"`
	JobDir string     `json:"job_dir"`
}

// Adopted decodes the job definition a source sent: the job's trees and
// the directory of its own files (Config.Trees and Config.JobDir).
func Adopted(in *migrate.Incoming) ([]TreeSpec, string, error) {
	var d jobDef
	if err := json.Unmarshal(in.Job, &d); err != nil {
		return nil, "", fmt.Errorf("the source's job definition: %w", err)
	}
	hosts := 0
	for _, t := range d.Trees {
		if t.Host {
			hosts++
		}
		if len(t.Argv) == 0 {
			return nil, "", errors.New("the source's job definition has a tree without a command")
		}
	}
	if hosts != 1 {
		return nil, "", errors.New("the source's job definition has no host tree")
	}
	if !filepath.IsAbs(d.JobDir) {
		return nil, "", fmt.Errorf("the source's job directory %q is not an absolute path", d.JobDir)
	}
	if fi, err := os.Stat(d.JobDir); err != nil || !fi.IsDir() {
		return nil, "", fmt.Errorf("the job's directory %s is not here (migrations need the job's files on a file system both nodes share)", d.JobDir)
	}
	if privilege.Root() {
		// Root's supervisor creates and reads files in it (the job's
		// TMPDIR mountpoint, its events, its heartbeat), as in a store of
		// its own: a directory root alone can change.
		if err := privilege.Trusted(d.JobDir); err != nil {
			return nil, "", fmt.Errorf("the job's directory, as root: %w", err)
		}
	}
	return d.Trees, d.JobDir, nil
}

// watchAdopted reports the restored job to the source: restored at once,
// running after the grace period if it did not fail meanwhile. It runs
// on the supervisor's goroutine through onEvent.
type adoptWatch struct {
	a         *Adopt
	restored  time.Time
	t0        time.Time
	done      bool
	failed    error
	committed chan error // the commit of the job's images, running meanwhile
	commitOK  bool
	noted     bool
}

func (w *adoptWatch) event(ev Event) {
	if w.done {
		return
	}
	switch ev.Kind {
	case "restored":
		if w.restored.IsZero() {
			w.restored = time.Now()
			if err := w.a.In.Restored(w.restored.Sub(w.t0)); err != nil {
				w.failed = err
			}
		}
	case "failure", "restore-failed", "gave-up", "skipped":
		if w.failed == nil {
			w.failed = errors.New(ev.Kind + ": " + ev.Detail)
		}
	}
}

// settle is called from the loop: once grace has passed since the restore
// it tells the source, and returns an error when the migration failed
// here (the caller ends the job).
func (w *adoptWatch) settle() error {
	if w.done {
		return nil
	}
	if w.failed != nil {
		w.done = true
		return w.failed
	}
	if !w.commitOK {
		select {
		case err := <-w.committed:
			if err != nil {
				w.done = true
				return err
			}
			w.commitOK = true
		default:
			return nil
		}
	}
	if w.restored.IsZero() || time.Since(w.restored) < w.a.Grace {
		return nil
	}
	w.done = true
	return w.a.In.Running()
}

// ErrMigrationFailed means a job migrated here failed before its source
// let it go: it was ended here and continues at the source.
var ErrMigrationFailed = errors.New("the migrated job failed here and goes back to its source")

// adopt runs a job migrated here: the generation the migration committed
// is restored (nothing older is tried: on failure the job goes back to its
// source), then supervised as any job.
func (s *Supervisor) adopt(ctx context.Context, a *Adopt) (int, error) {
	s.watch = &adoptWatch{a: a, t0: time.Now(), committed: make(chan error, 1)}
	s.writeRunState(StateRestoring, nil)
	s.setState(StateRestoring)
	m, ok := s.eng.(migrator)
	if !ok {
		return 1, errors.New("this supervisor cannot take migrated jobs")
	}
	res, err := m.RestoreImages(ctx, a.In, a.In.Manifest)
	if err != nil {
		s.watch.done = true
		_ = a.In.Fail(err)
		s.setExit(StateFailed, 1)
		return 1, fmt.Errorf("%w: restore: %w", ErrMigrationFailed, err)
	}
	took := time.Since(s.watch.t0)
	// The job runs: its downtime is over. Its images go into the store
	// meanwhile, so that it is a generation here before the source lets
	// go of it.
	go func() { s.watch.committed <- a.In.Commit(context.WithoutCancel(ctx)) }()
	s.cfg.Metrics.Restore(s.cfg.Name, true)
	s.initPID = res.PID
	s.afterStart()
	s.rootsFromRestore(res)
	s.event("restored", fmt.Sprintf("the job migrated here, job-init pid %d, in %s", res.PID, took.Round(time.Millisecond)), 0)
	return s.loop(ctx)
}

// settleAdopted, for a job migrated here, tells the source once the job
// lived through the grace period; when it failed meanwhile, it ends the
// job here and tells the source, which resumes it.
func (s *Supervisor) settleAdopted() error {
	w := s.watch
	if w == nil || w.done {
		return nil
	}
	failed := w.failed
	err := w.settle()
	if w.commitOK && !w.noted {
		// The job runs from this generation now, for the policy.
		w.noted = true
		s.pol.restored(w.a.In.Generation, w.restored)
	}
	if err == nil {
		if w.done {
			s.event("adopted", fmt.Sprintf("the source let the job go: it runs here only (generation %d here)", w.a.In.Generation), w.a.In.Generation)
		}
		return nil
	}
	s.terminate()
	s.setExit(StateFailed, 1)
	if failed != nil {
		// Failed here: back to the source, which has all of it.
		_ = w.a.In.Fail(err)
		return fmt.Errorf("%w: %w", ErrMigrationFailed, err)
	}
	// The source did not confirm that its copy ended: it may have resumed
	// the job (it had not heard that it runs here), so this copy ends.
	return fmt.Errorf("%w: %w; the job's state at the migration is generation %d of %s, should the source have lost it too",
		ErrMigrationFailed, err, w.a.In.Generation, s.cfg.Store)
}
