package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/workdir"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
)

// Held is a job dumped and left stopped, its images in a work directory
// and its pages given to a caller's sink instead of a store: the last step
// of a live migration, where the job must be able to go on here (Resume)
// until another node runs it (Kill). Exactly one of Resume and Kill is
// called, then Close.
type Held struct {
	// Images holds CRIU's images of the job but its pages-*.img (the
	// pagemaps are rebuilt from what the sink received), and outputs.json
	// when the job had output files open.
	Images string
	// Manifest describes the job as a generation would (job, processes,
	// offload contexts, CRIU and its statistics); it lists no files.
	Manifest *store.Manifest
	// Frozen is how long the job has been stopped when Hold returns.
	Frozen time.Duration

	o       Options
	tasks   []criu.Task
	grp     *offload.Group
	work    string
	closers []func()
	stopped time.Time
	done    bool
}

// Hold dumps the job rooted at o.PID with CRIU, streaming its memory pages
// to pages (as a checkpoint streams them to the store), and leaves it
// stopped with its offload contexts checkpointed, its images in a private
// work directory. It uses o's Store (for its lock, journal and logs; no
// generation is written), PID, CRIU, WorkDir, LockWait, CheckCache,
// Offload, OffloadLockTimeout, Logger, GhostLimit and CRIUConfig; a job of
// several trees, a replica, NoStream and Accept are refused. On failure
// the job runs on as before. The intent journal notes the stopped job, so
// that if cryo is killed while it holds it, `cryo recover` continues it.
func Hold(ctx context.Context, o Options, pages pageserver.Sink) (h *Held, err error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	switch {
	case pages == nil:
		return nil, errors.New("hold: no page sink")
	case len(o.MorePIDs) > 0 || o.Replica != "" || o.NoStream || o.Accept != nil:
		return nil, errors.New("hold: a job of one tree, without replica, NoStream or Accept")
	case o.PID <= 0 || o.PID == os.Getpid():
		return nil, fmt.Errorf("hold: invalid pid %d", o.PID)
	}
	o.Kill = true
	bin, criuConfig, err := vetCRIU(ctx, o, log)
	if err != nil {
		return nil, err
	}
	st, unlock, err := writeStore(ctx, o.Store, o.LockWait)
	if err != nil {
		return nil, err
	}
	h = &Held{o: o, closers: []func(){unlock}}
	defer func() {
		if err != nil {
			h.release()
		}
	}()
	reg := o.Offload
	if reg == nil {
		reg = drivers.Open(drivers.Config{Logger: log})
		h.closers = append(h.closers, func() { reg.Close() })
	}
	if err := recoverOffload(ctx, reg, st, log); err != nil {
		return nil, err
	}
	work, err := workdir.Make(o.WorkDir, filepath.Join(st.Dir, "staging"), 64<<20)
	if err != nil {
		return nil, err
	}
	h.work = work
	h.closers = append(h.closers, func() { os.RemoveAll(work) })
	h.Images = filepath.Join(work, "images")
	if err := os.Mkdir(h.Images, 0o700); err != nil {
		return nil, err
	}

	copts := criu.JobOptions(bin)
	copts.ImagesDir, copts.WorkDir, copts.LogFile = h.Images, work, "dump.log"
	copts.Pid, copts.LeaveRunning, copts.LeaveStopped = o.PID, false, true
	copts.SkipMounts = nodeMounts(o.PID)
	copts.GhostLimit, copts.ConfigFile = o.GhostLimit, criuConfig
	grp, err := offload.Quiesce(ctx, offload.QuiesceOptions{Registry: reg, Job: jobRef(o.PID),
		LockTimeout: o.OffloadLockTimeout, JournalDir: st.JournalDir(), Stops: true, Logger: log})
	if err != nil {
		return nil, err
	}
	h.grp = grp
	defer func() {
		if err != nil {
			err = errors.Join(err, grp.Resume(context.WithoutCancel(ctx)))
			if cerr := grp.Close(); cerr != nil {
				log.Warn("offload journal", "err", cerr)
			}
			h.grp = nil
		}
	}()
	if err := grp.NoteStopped(); err != nil {
		return nil, err
	}
	outs := scanOutputs(o)
	h.stopped = time.Now()
	stream, err := startSinkStream(pages, bin.Version)
	if err != nil {
		return nil, err
	}
	copts.PageServer = &criu.PageServerAddr{File: stream.theirs}
	derr := criu.Dump(ctx, bin, copts, nil)
	if serr := stream.finish(h.Images, derr); serr != nil && derr == nil {
		derr = serr
	}
	h.tasks, _ = criu.ReadTree(h.Images)
	if derr != nil {
		// CRIU resumes the job when it fails itself; when the page stream
		// failed after CRIU finished, the job is stopped: continue it.
		err = keepLog(st, derr, filepath.Join(work, "dump.log"), "dump")
		if grp.Len() > 0 {
			err = &offload.PhaseError{Phase: "dump", Err: err}
		}
		return nil, errors.Join(err, resume(o, h.tasks))
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, resume(o, h.tasks))
		}
	}()
	if len(h.tasks) == 0 {
		return nil, errors.New("hold: CRIU's images list no process")
	}
	stats, serr := criu.ReadDumpStats(work)
	if serr != nil {
		log.Warn("no CRIU dump statistics", "err", serr)
	}
	for _, sp := range outputsSpec(outs, h.Images, work, nil) {
		b, err := os.ReadFile(sp.Path)
		if err == nil {
			err = os.WriteFile(filepath.Join(h.Images, sp.Name), b, 0o600)
		}
		if err != nil {
			return nil, fmt.Errorf("record the job's output files: %w", err)
		}
	}
	h.Manifest = describe(o, bin, copts, grp, h.tasks, stats)
	h.Frozen = time.Since(h.stopped)
	return h, nil
}

// Resume lets the held job run on here, with its offload contexts back,
// as if it had never been dumped.
func (h *Held) Resume(ctx context.Context) error {
	if h.done {
		return errors.New("hold: the job was already resumed or killed")
	}
	h.done = true
	err := resume(h.o, h.tasks)
	if h.grp != nil {
		err = errors.Join(err, h.grp.Resume(ctx))
		if err == nil {
			err = h.grp.NoteContinued()
		}
	}
	return err
}

// Kill ends the held job (another node runs it now). With reap, the
// caller's children among its processes are reaped and their PIDs waited
// for.
func (h *Held) Kill(ctx context.Context, reap bool) error {
	if h.done {
		return errors.New("hold: the job was already resumed or killed")
	}
	h.done = true
	err := kill(ctx, h.o, h.tasks, reap)
	if h.grp != nil {
		h.grp.Forget()
	}
	return err
}

// StoppedFor is how long the job has been stopped so far.
func (h *Held) StoppedFor() time.Duration { return time.Since(h.stopped) }

// Close releases the store, the offload journal and the work directory.
// A job neither resumed nor killed is resumed first: Close never leaves a
// job stopped.
func (h *Held) Close() error {
	var err error
	if !h.done {
		err = h.Resume(context.Background())
	}
	if h.grp != nil {
		err = errors.Join(err, h.grp.Close())
		h.grp = nil
	}
	h.release()
	return err
}

func (h *Held) release() {
	for i := len(h.closers) - 1; i >= 0; i-- {
		h.closers[i]()
	}
	h.closers = nil
}
