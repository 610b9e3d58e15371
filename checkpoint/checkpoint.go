package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/workdir"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
)

// Version is cryo's version, recorded in every manifest.
var Version = "0.1.0"

// ChunkWindow is the address window that page chunks follow (see criu.Cuts).
const ChunkWindow = 1 << 20

// ErrNoProcess means the PID to checkpoint does not exist.
var ErrNoProcess = proc.ErrNoProcess

// Options are the choices for one checkpoint.
type Options struct {
	Store string // store directory; created if missing
	PID   int    // root of the process tree to checkpoint
	// Kill stops the job once the checkpoint is committed. The job is kept
	// stopped (not killed) while its images are stored, so that if storing
	// fails it is resumed as if nothing happened.
	Kill bool
	// MorePIDs are the roots of further trees of the same job, for trees
	// that cannot share one root: all of them are frozen at once (cgroup
	// v1 freezer) and each is dumped, into one generation.
	MorePIDs []int
	// CRIU is the binary to use, already located (criu.Locate).
	CRIU criu.Binary
	// WorkDir is where images wait between CRIU and the store; empty picks
	// RAM (/dev/shm) when it has room, else the store's staging directory.
	WorkDir string
	// Keep retains at most this many generations (0 keeps all).
	Keep int
	// LockWait is how long to wait for another writer of the store.
	LockWait time.Duration
	// CheckCache is where a passing `criu check` is remembered ("" = never).
	CheckCache string
	// NoStream makes CRIU write pages into the work directory (RAM when
	// there is room) instead of streaming them to cryo's page server.
	NoStream bool
	// Reap, with Kill, reaps killed processes that are children of the
	// caller (a supervisor's job-init) so that their PIDs become free.
	Reap bool
	// Offload finds and drives the job's offload contexts (nil: every
	// driver cryo has, configured from the environment).
	Offload *offload.Registry
	// OffloadLockTimeout bounds the lock of each offload context, that is
	// how long offload work in flight may take to drain (0: offload's
	// default).
	OffloadLockTimeout time.Duration
	// Replica is a second store directory (another disk, a partner node's
	// mount; created if missing) that gets a copy of every new chunk and
	// of the manifest, committed before the store's (see store's
	// replica.go). A replica that fails costs only its copy: the
	// generation is committed in Store and Result.ReplicaError says what
	// happened, unless ReplicaRequired makes it fail the checkpoint.
	Replica         string
	ReplicaRequired bool
	// PackSize is the size at which the pack files this checkpoint writes
	// (in Store and Replica, and when retention repacks) are closed, index
	// included; a single record larger than it has a pack of its own. 0
	// means store.DefaultPackLimit (256 MiB); otherwise it must lie within
	// store.MinPackLimit and store.MaxPackLimit (1 MiB to 64 GiB).
	PackSize int64
	// Progress, when set, counts the image bytes stored so far.
	Progress *store.Progress
	Logger   *slog.Logger
	// GhostLimit is the largest deleted file the job holds open (the
	// shared memory an MPI library maps and unlinks, say) whose contents
	// CRIU saves with the checkpoint, in bytes (0: CRIU's 1 MiB).
	GhostLimit uint32
	// CRIUConfig is a CRIU configuration file for what cryo has no option
	// for (criu.ConfigFile vets it and says what it must not set).
	CRIUConfig string
	// Accept, when set, is called just before the commit with what the
	// generation holds; an error refuses it: nothing is committed,
	// retention does not run, a Kill job is resumed, and Take returns an
	// error matching ErrRefused (see accept.go).
	Accept func(Dumped) error
}

// Result describes a committed checkpoint.
type Result struct {
	Generation int             `json:"generation"`
	Store      string          `json:"store"`
	Manifest   *store.Manifest `json:"-"`
	Processes  int             `json:"processes"`
	Frozen     time.Duration   `json:"frozen_ns"`
	Durable    time.Duration   `json:"durable_ns"`
	RawBytes   int64           `json:"raw_bytes"`
	NewBytes   int64           `json:"new_bytes"`
	Removed    []int           `json:"removed,omitempty"`
	Killed     bool            `json:"killed"`
	// Offload is the number of offload contexts (CUDA processes) whose
	// device state the checkpoint holds.
	Offload int `json:"offload_contexts,omitempty"`
	// TmpfsFiles is the number of tmpfs files (POSIX shared memory and
	// the like) whose contents the checkpoint holds, for a job not in
	// namespaces of its own (see tmpfs.go).
	TmpfsFiles int `json:"tmpfs_files,omitempty"`
	// Replica is the replica store that holds a copy of the generation;
	// ReplicaError, when set, says why it does not (the generation is then
	// in Store only).
	Replica      string `json:"replica,omitempty"`
	ReplicaBytes int64  `json:"replica_new_bytes,omitempty"`
	ReplicaError string `json:"replica_error,omitempty"`
}

// Take checkpoints the tree rooted at o.PID into a new generation of o.Store.
func Take(ctx context.Context, o Options) (res *Result, err error) {
	start := time.Now()
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.PID <= 0 {
		return nil, fmt.Errorf("invalid pid %d", o.PID)
	}
	if o.PID == os.Getpid() {
		return nil, fmt.Errorf("pid %d is cryo itself", o.PID)
	}
	for _, p := range append([]int{o.PID}, o.MorePIDs...) {
		if !proc.Live(p) {
			return nil, fmt.Errorf("pid %d: %w", p, ErrNoProcess)
		}
	}
	if err := store.CheckPackLimit(o.PackSize); err != nil {
		return nil, err
	}
	bin, criuConfig, err := vetCRIU(ctx, o, log)
	if err != nil {
		return nil, err
	}
	tmp, err := scanTmpfs(o)
	if err != nil {
		return nil, err
	}

	st, unlock, err := writeStore(ctx, o.Store, o.LockWait)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st.Progress = o.Progress
	st.PackLimit = o.PackSize
	rep, repErr := openReplica(ctx, o, o.LockWait, log)
	if rep != nil {
		defer rep.unlock()
	} else if repErr != nil && o.ReplicaRequired {
		return nil, repErr
	}
	reg := o.Offload
	if reg == nil {
		// Opened for this call alone, and closed with it.
		reg = drivers.Open(drivers.Config{Logger: log})
		defer reg.Close()
	}
	if err := recoverOffload(ctx, reg, st, log); err != nil {
		return nil, err
	}
	if n, err := st.CleanStaging(); err != nil {
		return nil, fmt.Errorf("clean staging: %w", err)
	} else if n > 0 {
		log.Info("removed work a killed cryo left in staging", "entries", n)
	}

	need := int64(64<<20) + tmp.bytes() // images but pages, with pages streamed
	if o.NoStream {
		need += treeRSS(o.PID)
	}
	work, err := workdir.Make(o.WorkDir, filepath.Join(st.Dir, "staging"), need)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	images := filepath.Join(work, "images")
	if err := os.Mkdir(images, 0o700); err != nil {
		return nil, err
	}
	if err := tmp.prepare(work); err != nil {
		return nil, err
	}
	log.Debug("dumping", "pid", o.PID, "work", work, "estimate", need)

	copts := criu.JobOptions(bin)
	copts.ImagesDir, copts.WorkDir, copts.LogFile = images, work, "dump.log"
	copts.Pid, copts.LeaveRunning, copts.LeaveStopped = o.PID, !o.Kill, o.Kill
	copts.SkipMounts = nodeMounts(o.PID)
	copts.GhostLimit, copts.ConfigFile = o.GhostLimit, criuConfig
	// Offload contexts: lock, then checkpoint, so their device state is in
	// host memory for CRIU. Until Resume (or the job's end) every failure
	// path must bring them back, after the tree runs again.
	grp, err := offload.Quiesce(ctx, offload.QuiesceOptions{Registry: reg, Job: jobRef(o.PID, o.MorePIDs...),
		LockTimeout: o.OffloadLockTimeout, JournalDir: st.JournalDir(), Stops: o.Kill, Logger: log})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, grp.Resume(context.WithoutCancel(ctx)))
		}
		if cerr := grp.Close(); cerr != nil {
			log.Warn("offload journal", "err", cerr)
		}
	}()
	if o.Kill {
		if err := grp.NoteStopped(); err != nil {
			return nil, err
		}
	}
	// The writer starts before the dump: with streaming, pages are
	// hashed, compressed and stored while CRIU is still dumping.
	// With leave-running, the workers wait until CRIU lets the job go, so
	// that hashing and compressing take no CPU from the frozen job's dump.
	w, err := st.NewWriterOpts(writerOptions(o, rep))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, w.Abort())
		}
	}()
	outs := scanOutputs(o)
	dumpStart := time.Now()
	trees, derr := dumpJob(ctx, bin, copts, w, o, images, work, tmp.frozen, log)
	if err := derr; err != nil {
		err = keepLog(st, err, filepath.Join(work, "dump.log"), "dump")
		if grp.Len() > 0 {
			err = &offload.PhaseError{Phase: "dump", Err: err}
		}
		return nil, err
	}
	dumpTime := time.Since(dumpStart)
	if !o.Kill {
		// CRIU let the tree run on; now its offload contexts may too.
		if err := grp.Resume(ctx); err != nil {
			return nil, fmt.Errorf("the job was dumped but its offload contexts could not be resumed: %w", err)
		}
	}
	tasks, err := readTrees(images, trees)
	if err != nil {
		return nil, errors.Join(err, resume(o, tasks))
	}
	// From here on, with Kill, the tree is stopped: every failure path must
	// resume it.
	defer func() {
		if err != nil && o.Kill {
			err = errors.Join(err, resume(o, tasks))
		}
	}()
	stats, serr := readStats(work, trees) // CRIU writes stats-dump to its work dir
	if serr != nil {
		log.Warn("no CRIU dump statistics", "err", serr)
	}
	log.Debug("dumped", "processes", len(tasks), "took", dumpTime, "frozen_ms", stats.FrozenMS)

	specs, err := fileSpecs(images, work)
	if err != nil {
		return nil, err
	}
	specs = append(specs, outputsSpec(outs, images, work, trees)...)
	tspecs, tmpFiles, err := tmp.specs(work, log)
	if err != nil {
		return nil, err
	}
	specs = append(specs, tspecs...)
	if err := w.AddFiles(ctx, specs); err != nil {
		return nil, fmt.Errorf("store images: %w", err)
	}
	log.Debug("stored", "since_start", time.Since(start))
	m := describe(o, bin, copts, grp, tasks, stats)
	m.Job.Trees = trees
	m.Stats.DumpMS, m.Stats.DurableMS = dumpTime.Milliseconds(), time.Since(start).Milliseconds()
	if err := accept(o, m); err != nil {
		return nil, err
	}
	gen, err := w.Commit(m)
	if err != nil {
		return nil, err
	}
	res = &Result{Generation: gen, Store: st.Dir, Manifest: m, Processes: len(tasks),
		Frozen: time.Duration(stats.FrozenMS) * time.Millisecond, Durable: time.Since(start),
		RawBytes: m.Stats.RawBytes, NewBytes: m.Stats.NewBytes, Offload: grp.Len(), TmpfsFiles: tmpFiles}
	log.Debug("committed", "generation", gen, "raw", m.Stats.RawBytes, "new", m.Stats.NewBytes, "durable", res.Durable)

	if o.Kill {
		// The checkpoint is safe: now the job may go.
		if kerr := kill(ctx, o, tasks, o.Reap); kerr != nil {
			log.Warn("job checkpointed but not all of it stopped", "err", kerr)
		}
		res.Killed = true
	}
	if removed, rerr := st.Retain(o.Keep); rerr != nil {
		log.Warn("retention", "err", rerr)
	} else {
		res.Removed = removed
	}
	rep.finish(res, w, repErr, o, log)
	return res, nil
}

// writerOptions decides how the store writer takes the page stream.
//
// With leave-running the job is frozen while its pages stream in, so they
// must arrive as fast as CRIU sends them: hashing and compression wait
// until the job runs again (Hold), and the pages wait in buffers faulted in
// before the freeze (Prefill), as much of the job's memory as half the
// free memory allows; the rest streams into fresh buffers or, past a
// quarter of free memory, waits for the workers.
//
// With Kill the job never runs again, so nothing is gained by letting CRIU
// race ahead of the workers into fresh memory: a short queue keeps a few
// warm buffers cycling between the page stream and the workers.
func writerOptions(o Options, rep *replica) store.WriterOptions {
	wo := store.WriterOptions{Replica: rep.store(), ReplicaRequired: o.ReplicaRequired}
	if o.NoStream {
		return wo
	}
	if o.Kill {
		wo.Queue = 4 * runtime.GOMAXPROCS(0)
		return wo
	}
	avail := memAvailable()
	wo.Hold = true
	wo.Queue = int(min(max(avail/4, 64<<20), 4<<30) / ChunkWindow)
	var rss int64
	for _, p := range append([]int{o.PID}, o.MorePIDs...) {
		rss += treeRSS(p)
	}
	wo.Prefill = min(rss+rss/32, avail/2)
	return wo
}

// fileSpecs lists the images to store, with page images cut at address
// windows, and CRIU's dump log as a "log" file.
func fileSpecs(images, work string) ([]store.FileSpec, error) {
	runs, err := criu.PageRuns(images)
	if err != nil {
		return nil, err
	}
	var specs []store.FileSpec
	err = filepath.WalkDir(images, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(images, p)
		sp := store.FileSpec{Path: p, Name: rel, Kind: "image"}
		if criu.IsPages(rel) {
			sp.Kind = "pages"
			sp.Cuts = criu.Cuts(runs[filepath.Base(rel)], ChunkWindow)
		}
		specs = append(specs, sp)
		return nil
	})
	if _, serr := os.Stat(filepath.Join(work, "dump.log")); serr == nil {
		specs = append(specs, store.FileSpec{Path: filepath.Join(work, "dump.log"), Name: "dump.log", Kind: "log"})
	}
	return specs, err
}

// keepLog copies a failed operation's CRIU log into the store's logs/ and
// points the error at the copy (the work directory is about to go).
// maxKeptLog is how much of a failed CRIU log the store keeps (its end).
const maxKeptLog = 16 << 20

func keepLog(st *store.Store, err error, log, op string) error {
	var ce *criu.Error
	if !errors.As(err, &ce) {
		return err
	}
	if _, serr := os.Stat(ce.Log); serr == nil {
		log = ce.Log // the failing tree's own log, with several trees
	}
	if dst, serr := st.SaveLog(op, log, maxKeptLog); serr == nil {
		ce.Log = dst
	}
	return err
}

// jobRef names the processes of the tree rooted at pid for the offload
// journal.
func jobRef(pid int, more ...int) offload.JobRef {
	job := offload.JobRef{RootPID: pid}
	var pids []int
	for _, root := range append([]int{pid}, more...) {
		ps, _ := proc.Tree(root)
		pids = append(pids, ps...)
	}
	for _, p := range pids {
		if st, err := proc.ReadStat(p); err == nil {
			job.Procs = append(job.Procs, offload.ProcRef{PID: p, StartTime: st.StartTime})
		}
	}
	return job
}

func treeRSS(pid int) int64 {
	pids, _ := proc.Tree(pid)
	var n int64
	for _, p := range pids {
		r, _ := proc.RSS(p)
		n += r
	}
	return n
}

// resume continues a tree that CRIU left stopped.
func resume(o Options, tasks []criu.Task) error {
	if !o.Kill {
		return nil
	}
	var errs []error
	for _, pid := range nodePIDs(o, tasks) {
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("resume pid %d: %w", pid, err))
		}
	}
	if len(tasks) == 0 {
		// We could not even read the tree: resume what we know of.
		for _, root := range append([]int{o.PID}, o.MorePIDs...) {
			pids, _ := proc.Tree(root)
			for _, p := range pids {
				_ = syscall.Kill(p, syscall.SIGCONT)
			}
		}
	}
	return errors.Join(errs...)
}

// nodePIDs are the node's PIDs of the checkpointed tasks, the ones to
// signal. The tasks' PIDs are those the images hold: for a job in a PID
// namespace of its own (its root is PID 1 there) they are that namespace's,
// and the same numbers on the node are other processes. A task not found
// below the checkpointed root is left out.
func nodePIDs(o Options, tasks []criu.Task) []int {
	var out []int
	if len(tasks) == 0 || tasks[0].PID != 1 || o.PID == 1 {
		for _, t := range tasks {
			out = append(out, t.PID)
		}
		return out
	}
	t, err := proc.All()
	if err != nil {
		return []int{o.PID} // the namespace's init: the rest follow it
	}
	onNode := proc.InnerPIDs(t, o.PID)
	for _, task := range tasks {
		if p, ok := onNode[task.PID]; ok {
			out = append(out, p)
		}
	}
	return out
}

// kill ends every task of a checkpointed tree. Like criu dump, it does not
// wait for a large job's memory to be torn down (a restore waits for the
// PIDs it needs), unless reap asks it to reap its own children, and then it
// waits until every PID is free. (A job in a PID namespace of its own ends
// whole with its root, that namespace's init.)
func kill(ctx context.Context, o Options, tasks []criu.Task, reap bool) error {
	pids := nodePIDs(o, tasks)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if !reap {
		return nil
	}
	for _, pid := range pids {
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil) // ECHILD for others' children
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var gone []string
	for _, pid := range pids {
		if err := proc.WaitGone(ctx, pid); err != nil {
			gone = append(gone, err.Error())
		}
	}
	if len(gone) > 0 {
		return errors.New(strings.Join(gone, "; "))
	}
	return nil
}

// withJobPIDs notes, for each record, its process's PID in the job's own
// PID namespace when that is not the PID cryo sees (a job in namespaces of
// its own): a restore there finds the process by it.
func withJobPIDs(recs []offload.Record) []offload.Record {
	for i := range recs {
		if ids, err := proc.NSpid(recs[i].PID); err == nil && len(ids) > 1 {
			recs[i].JobPID = ids[len(ids)-1]
		}
	}
	return recs
}

// vetCRIU finds CRIU usable for o (criu.Vet), with o's configuration file
// vetted, and for a user checks before anything is dumped that every
// process of the job is one CRIU may dump as them.
func vetCRIU(ctx context.Context, o Options, log *slog.Logger) (criu.Binary, string, error) {
	criuConfig, err := criu.ConfigFile(o.CRIUConfig)
	if err != nil {
		return criu.Binary{}, "", err
	}
	bin, err := criu.Vet(ctx, o.CRIU, o.CheckCache)
	if err != nil {
		return criu.Binary{}, "", err
	}
	log.Debug("criu", "path", bin.Path, "via", bin.Source, "version", bin.VersionString(), "unprivileged", bin.Unprivileged)
	if bin.Unprivileged {
		if err := userModePreflight(append([]int{o.PID}, o.MorePIDs...)); err != nil {
			return criu.Binary{}, "", err
		}
	}
	return bin, criuConfig, nil
}

// describe is the manifest of a dumped job but for its files: the job's
// processes, its offload contexts, how CRIU dumped it and its statistics.
func describe(o Options, bin criu.Binary, copts criu.Options, grp *offload.Group, tasks []criu.Task, stats criu.DumpStats) *store.Manifest {
	host, _ := os.Hostname()
	m := &store.Manifest{
		Created:   time.Now().UTC(),
		Host:      host,
		CreatedBy: "cryo " + Version,
		Job:       store.Job{RootPID: o.PID},
		Offload:   offload.ToManifest(withJobPIDs(grp.Records())),
		CRIU: store.CRIUInfo{Version: bin.VersionString(), LeaveRunning: !o.Kill,
			TCPEstablished: copts.TCPEstablished, ShellJob: copts.ShellJob},
		Stats: store.Stats{
			FrozenMS: stats.FrozenMS, FreezingMS: stats.FreezingMS, MemdumpMS: stats.MemdumpMS,
			MemwriteMS: stats.MemwriteMS, PagesScanned: stats.PagesScanned, PagesWritten: stats.PagesWritten,
		},
	}
	for _, t := range tasks {
		m.Job.Processes = append(m.Job.Processes, store.Process{PID: t.PID, PPID: t.PPID, PGID: t.PGID,
			SID: t.SID, Threads: t.Threads, TIDs: t.TIDs, Comm: t.Comm})
	}
	return m
}

// writeStore opens (or creates) the store at dir and takes its exclusive
// lock, waiting up to wait for another writer; unlock releases it.
func writeStore(ctx context.Context, dir string, wait time.Duration) (*store.Store, func(), error) {
	st, err := store.Create(dir, "cryo "+Version)
	if err != nil {
		return nil, nil, err
	}
	unlock, err := st.LockWithin(ctx, true, wait)
	if err != nil {
		return nil, nil, err
	}
	return st, unlock, nil
}

// recoverOffload brings back the offload contexts a cryo killed half-way
// may have left locked (the store's intent journals), before a new dump.
func recoverOffload(ctx context.Context, reg *offload.Registry, st *store.Store, log *slog.Logger) error {
	if _, err := offload.Recover(ctx, offload.RecoverOptions{Registry: reg, JournalDir: st.JournalDir(), Logger: log}); err != nil {
		return fmt.Errorf("a killed cryo left offload contexts locked and they cannot be recovered yet: %w", err)
	}
	return nil
}
