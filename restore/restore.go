package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/tmpfs"
	"github.com/cryo-hpc/cryo/internal/workdir"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
)

// Options are the choices for one restore.
type Options struct {
	Store      string
	Generation int // 0: the newest
	CRIU       criu.Binary
	WorkDir    string // where images are materialized; empty: RAM when it has room
	// PIDWait is how long to wait for a dying process that still holds one
	// of the job's PIDs (default 10 s).
	PIDWait time.Duration
	// Sibling makes the restored root a child of the calling process (for a
	// supervisor that waits for it); otherwise it is restored detached, in a
	// session of its own.
	Sibling    bool
	CheckCache string
	// DeviceMap chooses the GPUs the checkpoint's offload contexts go to
	// (see offload.Plan); without it they go to the recorded GPUs, or to
	// others of the same model when those are missing or full.
	DeviceMap []offload.MapEntry
	// Offload drives the offload contexts (nil: every driver cryo has,
	// configured from the environment).
	Offload *offload.Registry
	// LockWait is how long to wait for a checkpoint or GC holding the
	// store (default 30 s).
	LockWait time.Duration
	// Replica is a replica of the store (checkpoint.Options.Replica): a
	// damaged or missing chunk, or a damaged manifest, of the generation is
	// healed from it (verified, and written back into the store) before
	// any process starts. An unusable replica is logged and ignored.
	Replica string
	// Fallback restores the newest older generation that is intact (or
	// can be healed) when the chosen one is damaged (ErrCorrupt); the
	// generations passed over are in Result.Skipped. Other failures are
	// returned at once. See fallback.go.
	Fallback bool
	// Progress, when set, counts the image bytes materialized so far.
	Progress *store.Progress
	Logger   *slog.Logger
	// NoStream materializes the images into WorkDir and lets CRIU read
	// them from there, instead of streaming them from the store into the
	// restoring CRIU (see streamed). Lazy restores, and jobs of several
	// trees, always materialize.
	NoStream bool
	// Lazy starts the job before its memory is back: the pages of private
	// anonymous mappings are served on demand by cryo's page server through
	// CRIU's lazy-pages daemon, and the rest in the background. The caller
	// must call Result.Wait to see every page home.
	Lazy bool
	// CRIUConfig is a CRIU configuration file for what cryo has no option
	// for (criu.ConfigFile vets it and says what it must not set).
	CRIUConfig string
	// TruncateOutputs cuts the files the job had open for writing back to
	// their sizes at the checkpoint before it runs again (see outputs.go):
	// for a supervisor that restores a job whose output must not repeat.
	TruncateOutputs bool
	// Source serves the CRIU images of one tree (a job migrated here,
	// before it is committed), which Manifest describes (its Files name
	// each image and its size; no chunks), instead of a generation of
	// Store; they are streamed into CRIU. Store is still used for its
	// lock, the offload journal and CRIU's logs. Lazy and Fallback do not
	// apply.
	Source   criu.ImageSource
	Manifest *store.Manifest
}

// imageReader reads the first size bytes of an image of the generation
// being restored.
type imageReader func(name string, size int64) ([]byte, error)

// Result describes a restored job.
type Result struct {
	PID         int           `json:"pid"`
	Generation  int           `json:"generation"`
	Processes   int           `json:"processes"`
	Materialize time.Duration `json:"materialize_ns"`
	Restore     time.Duration `json:"restore_ns"`
	// Streamed says the images went from the store straight into CRIU
	// (Materialize is then 0 and Restore covers reading the store too).
	Streamed bool `json:"streamed,omitempty"`
	// ZeroLeftOut is the zero memory a streamed restore did not copy into
	// the job: private anonymous pages that start out zero anyway.
	ZeroLeftOut int64 `json:"zero_left_out,omitempty"`
	// Offload is the number of offload contexts restored and unlocked, and
	// DeviceMap where their devices went.
	Offload   int               `json:"offload_contexts,omitempty"`
	DeviceMap offload.DeviceMap `json:"device_map,omitempty"`
	// Healed lists the chunks (and "manifest.json") healed from the
	// replica; Skipped the damaged generations a Fallback passed over.
	Healed  []store.Problem `json:"healed,omitempty"`
	Skipped []Skip          `json:"skipped,omitempty"`
	// LazyBytes is how much memory a lazy restore left to be served after
	// the job started, and LazyServed how much it served (after Wait).
	// PIDs are the root PIDs of each tree, for a job of several trees.
	PIDs       []int         `json:"pids,omitempty"`
	LazyBytes  int64         `json:"lazy_bytes,omitempty"`
	LazyServed int64         `json:"lazy_served,omitempty"`
	LazyDone   time.Duration `json:"lazy_done_ns,omitempty"`
	// Truncated are the output files cut back (TruncateOutputs), and
	// TruncateError why others could not be.
	Truncated     []outputs.Cut `json:"truncated,omitempty"`
	TruncateError string        `json:"truncate_error,omitempty"`
	// TmpfsFiles are the tmpfs files (shared memory) of a job without
	// namespaces of its own that were brought back to the checkpoint
	// before it ran (see tmpfs.go), and TmpfsLeft others' files that
	// were missing or changed and left as they are.
	TmpfsFiles []tmpfs.Outcome `json:"tmpfs_files,omitempty"`
	TmpfsLeft  []string        `json:"tmpfs_left,omitempty"`

	finish func(context.Context) error // a lazy restore's page service
}

// Wait, after a lazy restore, waits until all of the job's memory has been
// served, then releases the store and the work directory. It returns at
// once for a full restore.
func (r *Result) Wait(ctx context.Context) error {
	if r == nil || r.finish == nil {
		return nil
	}
	f := r.finish
	r.finish = nil
	return f(ctx)
}

// Restore restores a generation of o.Store.
func Restore(ctx context.Context, o Options) (*Result, error) {
	if o.Fallback {
		return restoreFallback(ctx, o)
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	criuConfig, err := criu.ConfigFile(o.CRIUConfig)
	if err != nil {
		return nil, err
	}
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	st.Progress = o.Progress
	lockWait := o.LockWait
	if lockWait == 0 {
		lockWait = store.DefaultLockWait
	}
	unlock, err := st.LockWithin(ctx, false, lockWait)
	if err != nil {
		return nil, err
	}
	defer unlock()
	rep, unlockRep := openReplica(ctx, o.Replica, st, lockWait, log)
	defer unlockRep()
	reg := o.Offload
	if reg == nil {
		// Opened for this call alone, and closed with it.
		reg = drivers.Open(drivers.Config{Logger: log})
		defer reg.Close()
	}
	// A cryo killed half-way may have left a job's offload contexts locked.
	if _, err := offload.Recover(ctx, offload.RecoverOptions{Registry: reg, JournalDir: st.JournalDir(), Logger: log}); err != nil {
		return nil, fmt.Errorf("a killed cryo left offload contexts locked and they cannot be recovered yet: %w", err)
	}

	var (
		gen    int
		m      *store.Manifest
		healed []store.Problem
		read   imageReader
	)
	if o.Source != nil {
		if o.Manifest == nil || o.Lazy || o.NoStream || len(o.Manifest.Job.Trees) > 0 {
			return nil, errors.New("restore from an image source: a manifest of one tree is needed, streamed, not lazy")
		}
		m = o.Manifest
		read = func(name string, size int64) ([]byte, error) { return readFromSource(ctx, o.Source, name, size) }
	} else {
		if gen, m, healed, err = o.generation(st, rep, log); err != nil {
			return nil, err
		}
		read = func(name string, size int64) ([]byte, error) { return st.ReadAt(m, name, 0, size) }
	}
	bin, err := criu.Vet(ctx, o.CRIU, o.CheckCache)
	if err != nil {
		return nil, err
	}
	wait := o.PIDWait
	if wait == 0 {
		wait = 10 * time.Second
	}
	// A job in PID namespaces of its own (cryo run's: its root is PID 1)
	// comes back in fresh ones, where its PIDs cannot be taken.
	if !ownPIDNamespace(m) {
		if err := pidsFree(ctx, m, wait, log); err != nil {
			return nil, err
		}
	}
	// The job's owner: the user whose CRIU restores it, or (as root) the
	// credentials every process of the images has.
	uid, gid := os.Getuid(), os.Getgid()
	if !bin.Unprivileged {
		if uid, gid, err = sameOwner(m, read); err != nil {
			return nil, fmt.Errorf("restore generation %d: %w", gen, err)
		}
	}
	// The job's GPUs (or others that can take its device state) must be
	// here before anything starts.
	recs := offload.FromManifest(m.Offload)
	dmap, err := offload.PlanRestore(ctx, reg, recs, o.DeviceMap)
	if err != nil {
		return nil, fmt.Errorf("restore generation %d: %w", gen, err)
	}

	cuts, cutErr := o.cutOutputs(m, read)
	if cutErr != nil {
		log.Warn("output files not cut back to the checkpoint", "err", cutErr)
	}
	for _, c := range cuts {
		log.Info("output file cut back to the checkpoint", "file", c.Path, "from", c.From, "to", c.To)
	}
	var tmpDone []tmpfs.Outcome
	var tmpLeft []string
	if !ownPIDNamespace(m) {
		if tmpDone, tmpLeft, err = recreateTmpfs(m, read, uid, gid, !bin.Unprivileged); err != nil {
			return nil, fmt.Errorf("restore generation %d: %w", gen, err)
		}
		for _, t := range tmpDone {
			log.Info("tmpfs file brought back to the checkpoint", "file", t.Path, "action", t.Action, "bytes", t.Size)
		}
		for _, l := range tmpLeft {
			log.Warn("tmpfs file of someone else's left as it is", "file", l)
		}
	}
	stream := o.Source != nil || o.streamed(st, m, rep != nil, log)
	need := m.RawBytes() + 16<<20
	if stream {
		need = 16 << 20 // CRIU's log and the streamer's socket
	}
	work, err := workdir.Make(o.WorkDir, filepath.Join(st.Dir, "staging"), need)
	if err != nil {
		return nil, err
	}
	keepWork := false // a lazy restore's work directory outlives Restore
	defer func() {
		if !keepWork {
			os.RemoveAll(work)
		}
	}()
	images := filepath.Join(work, "images")
	if err := os.Mkdir(images, 0o700); err != nil {
		return nil, err
	}
	t0 := time.Now()
	var kinds []string
	if o.Lazy {
		kinds = []string{"image"} // pages follow, rewritten for lazy service
	}
	var fixed []store.Problem
	var src *store.Source
	var zs *zeroSkip
	if o.Source != nil {
		// Served by the caller.
	} else if stream {
		src = st.NewSource(m, rep)
		if zs, err = planZeroSkip(st, m); err != nil {
			if errors.Is(err, store.ErrCorrupt) && rep == nil {
				return nil, err
			}
			log.Warn("restoring zero memory too", "why", err)
			zs = &zeroSkip{}
		}
	} else {
		fixed, err = st.MaterializeFrom(ctx, m, images, rep, kinds...)
		for _, p := range fixed {
			log.Info("healed a damaged chunk from the replica", "generation", gen, "problem", p.String())
		}
		if err != nil {
			return nil, err
		}
	}
	res := &Result{Generation: gen, Processes: len(m.Job.Processes), Materialize: time.Since(t0), Healed: append(healed, fixed...), Streamed: stream}
	if zs != nil {
		res.ZeroLeftOut = zs.bytes
	}
	res.Truncated = cuts
	res.TmpfsFiles, res.TmpfsLeft = tmpDone, tmpLeft
	if cutErr != nil {
		res.TruncateError = cutErr.Error()
	}
	var lazy *lazySession
	if o.Lazy && len(m.Job.Trees) > 0 {
		return nil, fmt.Errorf("generation %d holds %d trees: restore it without --lazy", gen, len(m.Job.Trees))
	}
	if o.Lazy {
		if lazy, err = prepareLazy(ctx, st, m, images, work, bin, log); err != nil {
			return nil, err
		}
		defer func() {
			if res.finish == nil {
				lazy.stop() // the restore failed
			}
		}()
		res.LazyBytes = lazy.lazy
		res.Materialize = time.Since(t0)
	}
	log.Debug("materialized", "generation", gen, "bytes", m.RawBytes(), "took", res.Materialize)

	job := offload.JobRef{RootPID: m.Job.RootPID}
	if !ownPIDNamespace(m) {
		// (In a PID namespace of its own the job's PIDs are the
		// namespace's: the same numbers on the node are others'.)
		for _, p := range m.Job.Processes {
			job.Procs = append(job.Procs, offload.ProcRef{PID: p.PID})
		}
	}
	grp, err := offload.Attach(ctx, offload.AttachOptions{Registry: reg, Records: recs, Map: dmap, Job: job, Rebind: ownPIDNamespace(m),
		JournalDir: st.JournalDir(), Logger: log})
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := grp.Close(); cerr != nil {
			log.Warn("offload journal", "err", cerr)
		}
	}()

	t1 := time.Now()
	copts := criu.JobOptions(bin)
	copts.ImagesDir, copts.WorkDir, copts.LogFile = images, work, "restore.log"
	copts.RestoreSibling, copts.RestoreDetached, copts.LazyPages = o.Sibling, !o.Sibling, o.Lazy
	copts.ConfigFile = criuConfig
	// A job is restored as it was dumped.
	copts.TCPEstablished, copts.ShellJob = m.CRIU.TCPEstablished, m.CRIU.ShellJob
	names := make([]string, 0, len(m.Files))
	for _, f := range m.Files {
		names = append(names, f.Name)
	}
	copts.Root = criu.MountNamespaceRoot(names)
	var pid int
	if len(m.Job.Trees) > 0 {
		var pids []int
		pids, err = restoreTrees(ctx, bin, copts, images, work, m.Job.Trees)
		pid, res.PIDs = pids[0], pids
	} else if stream {
		var isrc criu.ImageSource = o.Source
		if isrc == nil {
			isrc = skippingSource{src, zs}
		}
		pid, err = criu.RestoreStreamed(ctx, bin, copts, isrc)
		if err != nil && o.Sibling {
			// CRIU had created the job's root as our child before the
			// stream failed, and killed it: reap it (and any of its
			// processes a subreaper inherited), or their PIDs stay taken
			// for the next attempt.
			for _, p := range m.Job.Processes {
				reapChild(p.PID, 5*time.Second)
			}
		}
		if src != nil {
			for _, p := range src.Healed() {
				log.Info("healed a damaged chunk from the replica", "generation", gen, "problem", p.String())
				res.Healed = append(res.Healed, p)
			}
			if herr := src.Finish(); herr != nil {
				log.Warn("healed chunks could not all be written back into the store", "err", herr)
			}
		}
	} else {
		pid, err = criu.Restore(ctx, bin, copts, nil)
	}
	if err != nil {
		var ce *criu.Error
		if errors.As(err, &ce) {
			if dst, serr := st.SaveLog("restore", ce.Log, 16<<20); serr == nil {
				ce.Log = dst
			}
		}
		return nil, fmt.Errorf("restore generation %d: %w", gen, err)
	}
	res.PID, res.Restore = pid, time.Since(t1)
	log.Debug("restored", "pid", pid, "took", res.Restore)
	if grp.Len() > 0 {
		// The job runs; its offload contexts wait, locked, for their state.
		// In fresh PID namespaces its processes have new PIDs on the node:
		// found by those of the job's namespace, which the images keep.
		var err error
		if ownPIDNamespace(m) {
			err = rebind(grp, pid)
		}
		if err == nil {
			err = grp.Refresh()
		}
		if err == nil {
			err = grp.Resume(ctx)
		}
		if err != nil {
			// It cannot go on without its device state: stop it, so that the
			// checkpoint can be restored again.
			if kerr := killJob(m, pid); kerr != nil {
				return nil, fmt.Errorf("restore generation %d: %w; killing the restored job failed too: %w", gen, err, kerr)
			}
			grp.Forget()
			return nil, fmt.Errorf("restore generation %d: %w; the restored job was killed, the checkpoint is intact", gen, err)
		}
		res.Offload, res.DeviceMap = grp.Len(), dmap
		log.Debug("offload contexts restored", "contexts", grp.Len(), "map", dmap)
	}
	if lazy != nil {
		// The store must stay as it is, and the work directory with the
		// daemon's images, until every page is home: a shared lock of the
		// session's own holds the store past this function.
		hold, err := st.Lock(ctx, false)
		if err != nil {
			return nil, err
		}
		keepWork = true
		res.finish = func(ctx context.Context) error {
			defer hold()
			defer os.RemoveAll(work)
			n, err := lazy.wait(ctx)
			res.LazyServed, res.LazyDone = n, time.Since(lazy.started)
			log.Debug("lazy pages served", "bytes", n, "took", res.LazyDone)
			if err != nil {
				logf := filepath.Join(work, "lazy-pages.log")
				if dst, serr := st.SaveLog("lazy-pages", logf, 16<<20); serr == nil {
					logf = dst
				}
				return fmt.Errorf("serving the lazy pages of generation %d: %w (CRIU's log: %s)", gen, err, logf)
			}
			return nil
		}
	}
	return res, nil
}

// streamed decides whether the images go from the store straight into
// CRIU: always, but for lazy restores and jobs of several trees (which need
// CRIU's RPC), or when asked not to. A generation with chunks missing or
// cut short is materialized instead, so that every problem is named (or
// healed from the replica) before any process starts; damage that only
// reading finds ends a streamed restore before the job runs.
func (o Options) streamed(st *store.Store, m *store.Manifest, replica bool, log *slog.Logger) bool {
	if o.NoStream || o.Lazy || len(m.Job.Trees) > 0 {
		return false
	}
	if ps := st.Quick(m); len(ps) > 0 {
		log.Debug("not streaming a damaged generation", "generation", m.Generation, "problems", len(ps), "replica", replica)
		return false
	}
	return true
}

// reapChild waits up to limit for pid, if it is a child of ours, to end,
// and reaps it.
func reapChild(pid int, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		if got == pid || errors.Is(err, syscall.ECHILD) || time.Now().After(deadline) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// killJob kills the processes of a job restored from m with its root at
// root (the node's PID) and waits for them to go. A job in a PID namespace
// of its own ends whole with its root, that namespace's init: the PIDs of
// m are the namespace's, and the same numbers on the node are others'.
func killJob(m *store.Manifest, root int) error {
	pids := []int{root}
	if !ownPIDNamespace(m) {
		pids = pids[:0]
		for _, p := range m.Job.Processes {
			pids = append(pids, p.PID)
		}
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	for _, pid := range pids {
		errs = append(errs, proc.WaitGone(ctx, pid))
	}
	return errors.Join(errs...)
}

// rebind points the offload contexts of a job restored in fresh PID
// namespaces, with its root at root (the node's PID), at the PIDs their
// processes have on the node now: those with the PIDs the records name in
// the job's namespace. A context whose process is not found is an error:
// its old PID on the node names another process now, or none.
func rebind(grp *offload.Group, root int) error {
	t, err := proc.All()
	if err != nil {
		return fmt.Errorf("offload contexts: find the restored processes: %w", err)
	}
	inner := proc.InnerPIDs(t, root)
	return grp.Rebind(func(r offload.Record) (int, error) {
		if r.JobPID <= 0 {
			return 0, errors.New("the checkpoint does not say which PID its process has in the job's namespace (written by an older cryo?)")
		}
		if p := inner[r.JobPID]; p > 0 {
			return p, nil
		}
		return 0, fmt.Errorf("its process (pid %d in the job's namespace) is not among the restored ones", r.JobPID)
	})
}

// ownPIDNamespace tells whether the generation's job lives in a PID
// namespace of its own: its root process is that namespace's PID 1.
func ownPIDNamespace(m *store.Manifest) bool {
	return len(m.Job.Processes) > 0 && m.Job.Processes[0].PID == 1
}

// generation picks the generation to restore (o.Generation, or the newest)
// and reads its manifest, healing it from the replica when it is damaged.
func (o Options) generation(st *store.Store, rep *store.Store, log *slog.Logger) (int, *store.Manifest, []store.Problem, error) {
	gen := o.Generation
	if gen == 0 {
		gens, err := st.Generations()
		if err != nil {
			return 0, nil, nil, err
		}
		if len(gens) == 0 {
			return 0, nil, nil, fmt.Errorf("%w: store %s has no checkpoints yet", store.ErrNoGeneration, st.Dir)
		}
		gen = gens[len(gens)-1]
	}
	var healed []store.Problem
	m, err := st.ReadManifest(gen)
	if err != nil && rep != nil && errors.Is(err, store.ErrCorrupt) {
		var herr error
		if m, herr = st.HealManifest(rep, gen); herr != nil {
			return 0, nil, nil, fmt.Errorf("%w; %v", err, herr)
		}
		healed = append(healed, store.Problem{File: "manifest.json", Chunk: -1, Path: filepath.Join(st.GenDir(gen), "manifest.json"),
			Reason: err.Error() + "; restored from the replica"})
		log.Info("healed a damaged manifest from the replica", "generation", gen, "replica", rep.Dir)
		err = nil
	}
	return gen, m, healed, err
}

// readFromSource reads the first size bytes of image name from src.
func readFromSource(ctx context.Context, src criu.ImageSource, name string, size int64) ([]byte, error) {
	if size < 0 || size > store.MaxImage {
		return nil, fmt.Errorf("%s: %d bytes", name, size)
	}
	if !src.Has(name) {
		return nil, fmt.Errorf("%w: image %s is missing", store.ErrCorrupt, name)
	}
	w := &limitBuffer{b: make([]byte, 0, size)}
	if err := src.Send(ctx, name, w); err != nil && !errors.Is(err, errEnough) {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if int64(len(w.b)) < size {
		return nil, fmt.Errorf("%w: image %s is shorter than %d bytes", store.ErrCorrupt, name, size)
	}
	return w.b, nil
}

var errEnough = errors.New("read enough")

// limitBuffer keeps what is written up to its capacity, then refuses.
type limitBuffer struct{ b []byte }

func (l *limitBuffer) Write(p []byte) (int, error) {
	n := min(len(p), cap(l.b)-len(l.b))
	l.b = append(l.b, p[:n]...)
	if n < len(p) {
		return n, errEnough
	}
	return n, nil
}
