package cryo

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/inspect"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/wire"
	"github.com/cryo-hpc/cryo/migrate"
	"github.com/cryo-hpc/cryo/monitor"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda"
	"github.com/cryo-hpc/cryo/offload/drivers"
	"github.com/cryo-hpc/cryo/restore"
)

// Sentinel errors; the errors returned by this package wrap them.
var (
	// ErrNoStore means the directory is not a cryo store.
	ErrNoStore = store.ErrNoStore
	// ErrLocked means another cryo holds the store (a checkpoint is being
	// written, or a GC runs).
	ErrLocked = store.ErrLocked
	// ErrCorrupt means a generation failed verification.
	ErrCorrupt = store.ErrCorrupt
	// ErrNoGeneration means the store has no such generation (or none).
	ErrNoGeneration = store.ErrNoGeneration
	// ErrPIDInUse means a PID the restored job needs is held by a live process.
	ErrPIDInUse = restore.ErrPIDInUse
	// ErrNoProcess means the PID to checkpoint does not exist.
	ErrNoProcess = checkpoint.ErrNoProcess
	// ErrSameStore means a replica given to Repair is the store itself.
	ErrSameStore = errors.New("the replica is the store itself")
)

// Version is cryo's version, as recorded in every manifest.
func Version() string { return checkpoint.Version }

// Progress counts the bytes a long operation (checkpoint, restore, verify,
// repair) has processed, and its total when known; give a new one in the
// options and read it from another goroutine.
type Progress = store.Progress

// Problem is one damaged or missing chunk or file of a generation.
type Problem = store.Problem

// CheckpointOptions are the choices for one checkpoint.
type CheckpointOptions struct {
	Store string // the job's store; created if missing
	PID   int    // root of the process tree to checkpoint
	// MorePIDs are the roots of further trees of the same job that cannot
	// share its root: all are frozen at once and dumped into one
	// generation (cgroup v1 freezer).
	MorePIDs []int
	// Kill ends the tree once its checkpoint is committed. Until then the
	// tree is held stopped, so if storing fails it simply resumes.
	Kill bool
	// Keep retains at most this many generations (0 keeps all).
	Keep int
	// CRIU is the CRIU binary; "" means $CRYO_CRIU, then criu on PATH.
	CRIU string
	// WorkDir is where images wait between CRIU and the store; "" picks
	// RAM (/dev/shm) when it has room.
	WorkDir string
	// LockWait bounds the wait for another writer of the store (default 30 s).
	LockWait time.Duration
	// OffloadTimeout bounds how long GPU work in flight may take to drain
	// when the job's offload contexts are locked (default 30 s).
	OffloadTimeout time.Duration
	// Replica is a second store directory that gets a copy of the
	// generation, committed before the store's. A failing replica does not
	// fail the checkpoint (CheckpointResult.ReplicaError says why the copy
	// is missing) unless ReplicaRequired.
	Replica         string
	ReplicaRequired bool
	// PackSize is the size at which the pack files the checkpoint writes
	// are closed (0: DefaultPackSize); it must lie within MinPackSize and
	// MaxPackSize. A pack stays within it, but one that holds a single
	// chunk larger than it on its own.
	PackSize int64
	// GhostLimit is the largest deleted file the job holds open (the
	// shared memory an MPI library maps and unlinks, say) whose contents
	// CRIU saves with the checkpoint, in bytes (0: CRIU's 1 MiB).
	GhostLimit uint32
	// CRIUConfig is a CRIU configuration file for the options cryo has
	// none of; as root it must be root's alone (see internal/criu's
	// ConfigFile for what it must not set).
	CRIUConfig string
	// Offload is the node's offload drivers (offload/drivers.Open), opened
	// once by a process that checkpoints or restores more than once; nil
	// opens them for this call and closes them after it.
	Offload *offload.Registry
	// Progress, when set, counts the image bytes stored so far.
	Progress *Progress
	Logger   *slog.Logger
}

// A store keeps chunks in a few large pack files (see docs/DESIGN.md);
// DefaultPackSize is the size a pack is closed at unless the caller sets
// CheckpointOptions.PackSize or GCOptions.PackSize, which must lie within
// MinPackSize and MaxPackSize.
const (
	DefaultPackSize = store.DefaultPackLimit
	MinPackSize     = store.MinPackLimit
	MaxPackSize     = store.MaxPackLimit
)

// CheckpointResult describes a committed generation: what `cryo
// checkpoint --json` prints.
type CheckpointResult = checkpoint.Result

// Checkpoint takes a consistent snapshot of the process tree rooted at
// o.PID and commits it as a new generation of o.Store. A failed checkpoint
// leaves the tree running as it was and the older generations untouched.
// It needs root (CRIU).
func Checkpoint(ctx context.Context, o CheckpointOptions) (*CheckpointResult, error) {
	bin, err := criu.Locate(o.CRIU, os.Getenv)
	if err != nil {
		return nil, err
	}
	reg, done := openOffload(o.Offload, o.Logger)
	defer done()
	res, err := checkpoint.Take(ctx, checkpoint.Options{
		Store: o.Store, PID: o.PID, MorePIDs: o.MorePIDs, Kill: o.Kill, CRIU: bin, WorkDir: o.WorkDir,
		Keep: o.Keep, LockWait: o.LockWait, CheckCache: criu.DefaultCheckCache(), Offload: reg,
		OffloadLockTimeout: o.OffloadTimeout, Replica: o.Replica, ReplicaRequired: o.ReplicaRequired, PackSize: o.PackSize,
		GhostLimit: o.GhostLimit, CRIUConfig: o.CRIUConfig, Progress: o.Progress, Logger: o.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint of pid %d failed: %w", o.PID, err)
	}
	return res, nil
}

// RestoreOptions are the choices for one restore.
type RestoreOptions struct {
	Store string
	// Generation to restore; 0 means the newest.
	Generation int
	// Fallback restores the newest older generation that is intact (or can
	// be healed from Replica) when the chosen one is damaged; the
	// generations passed over are in RestoreResult.Skipped. Other failures
	// (a PID in use, CRIU refusing) are returned at once.
	Fallback bool
	CRIU     string // as in CheckpointOptions
	WorkDir  string // where images are materialized; "" picks RAM when it has room
	// PIDWait bounds the wait for a dying process that still holds one of
	// the job's PIDs (default 10 s); a live holder fails at once with
	// ErrPIDInUse.
	PIDWait time.Duration
	// LockWait bounds the wait for a checkpoint or GC holding the store
	// (default 30 s).
	LockWait time.Duration
	// Child makes the restored root a child of the calling process, which
	// must then wait for it; otherwise it is restored detached, in a
	// session of its own.
	Child bool
	// DeviceMap chooses the GPUs the checkpoint's offload contexts go to
	// (offload.ParseDeviceMap reads "OLD=NEW,..."); without it they go to
	// the recorded GPUs, or to others of the same model with room.
	DeviceMap []offload.MapEntry
	// Replica is a replica of the store: damaged chunks or a damaged
	// manifest are healed from it before any process starts.
	Replica string
	// Lazy starts the job before its memory is back: pages are served on
	// demand and in the background, until RestoreResult.Wait returns.
	Lazy bool
	// NoStream materializes the images into WorkDir instead of streaming
	// them from the store into CRIU.
	NoStream bool
	// CRIUConfig is as in CheckpointOptions.
	CRIUConfig string
	// Offload is as in CheckpointOptions.
	Offload  *offload.Registry
	Progress *Progress // counts the image bytes verified so far
	Logger   *slog.Logger
}

// RestoreResult describes a restored job: what `cryo restore --json`
// prints. After a lazy restore, Wait serves the job's memory until all of
// it is home.
type RestoreResult = restore.Result

// Restore brings a job back from its store. Every chunk is verified before
// any process is created (or, streamed, before CRIU lets the job run), so
// a damaged generation starts nothing. It needs root (CRIU).
func Restore(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	bin, err := criu.Locate(o.CRIU, os.Getenv)
	if err != nil {
		return nil, err
	}
	reg, done := openOffload(o.Offload, o.Logger)
	defer done()
	res, err := restore.Restore(ctx, restore.Options{
		Store: o.Store, Generation: o.Generation, Fallback: o.Fallback, CRIU: bin, WorkDir: o.WorkDir,
		PIDWait: o.PIDWait, LockWait: o.LockWait, Sibling: o.Child, CheckCache: criu.DefaultCheckCache(),
		DeviceMap: o.DeviceMap, Offload: reg, Replica: o.Replica, Lazy: o.Lazy, NoStream: o.NoStream,
		CRIUConfig: o.CRIUConfig, Progress: o.Progress, Logger: o.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("restore failed: %w", err)
	}
	return res, nil
}

// openOffload returns reg, or the node's drivers opened for one call with
// the function that closes them.
func openOffload(reg *offload.Registry, log *slog.Logger) (*offload.Registry, func()) {
	if reg != nil {
		return reg, func() {}
	}
	reg = drivers.Open(drivers.Config{Logger: log})
	return reg, func() { reg.Close() }
}

// Generation is one committed checkpoint of a store, as List sees it.
type Generation struct {
	Number      int       `json:"generation"`
	Created     time.Time `json:"created,omitzero"`
	Host        string    `json:"host,omitempty"`
	RootPID     int       `json:"root_pid,omitempty"`
	Processes   int       `json:"processes"`
	RawBytes    int64     `json:"raw_bytes"`
	StoredBytes int64     `json:"stored_bytes"`
	// Intact means the manifest checks out and every chunk is present with
	// its recorded size; Verify re-hashes the contents too.
	Intact  bool   `json:"intact"`
	Problem string `json:"problem,omitempty"`
}

// List returns the committed generations of the store at dir, oldest
// first, each with a quick integrity check that reads no chunk contents.
// It takes the store's shared lock, so it waits (up to 30 s, or until ctx
// ends) while a checkpoint is being committed.
func List(ctx context.Context, dir string) ([]Generation, error) {
	st, err := store.Open(dir)
	if err != nil {
		return nil, err
	}
	unlock, err := st.LockWithin(ctx, false, 0)
	if err != nil {
		return nil, err
	}
	defer unlock()
	gens, err := st.Generations()
	if err != nil {
		return nil, err
	}
	out := []Generation{}
	for _, g := range gens {
		info := Generation{Number: g}
		m, err := st.ReadManifest(g)
		if err != nil {
			info.Problem = err.Error()
			out = append(out, info)
			continue
		}
		info.Created, info.Host, info.RootPID, info.Processes = m.Created, m.Host, m.Job.RootPID, len(m.Job.Processes)
		info.RawBytes, info.StoredBytes = m.Stats.RawBytes, m.Stats.StoredBytes
		if ps := st.Quick(m); len(ps) > 0 {
			info.Problem = ps[0].String()
			if len(ps) > 1 {
				info.Problem += fmt.Sprintf(" (+%d more)", len(ps)-1)
			}
		} else {
			info.Intact = true
		}
		out = append(out, info)
	}
	return out, nil
}

// VerifyOptions are the choices for Verify.
type VerifyOptions struct {
	Store      string
	Generation int       // 0: every generation
	Progress   *Progress // counts the bytes hashed so far
}

// Verification is the outcome of verifying one generation.
type Verification struct {
	Generation int       `json:"generation"`
	Intact     bool      `json:"intact"`
	Problems   []Problem `json:"problems,omitempty"` // one per bad chunk or file
	// Error says why the generation could not be verified at all (its
	// manifest is missing or damaged).
	Error string `json:"error,omitempty"`
}

// Verify re-hashes every chunk of a generation (every generation when
// o.Generation is 0) and says what is damaged. The error is only for
// failing to verify at all; damage is reported in the results.
func Verify(ctx context.Context, o VerifyOptions) ([]Verification, error) {
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	st.Progress = o.Progress
	unlock, err := st.LockWithin(ctx, false, 0)
	if err != nil {
		return nil, err
	}
	defer unlock()
	gens := []int{o.Generation}
	if o.Generation == 0 {
		if gens, err = st.Generations(); err != nil {
			return nil, err
		}
	}
	out := []Verification{}
	for _, g := range gens {
		v := Verification{Generation: g}
		m, err := st.ReadManifest(g)
		if err != nil {
			v.Error = err.Error()
		} else {
			v.Problems = st.Verify(ctx, m)
		}
		v.Intact = v.Error == "" && len(v.Problems) == 0
		out = append(out, v)
	}
	return out, ctx.Err()
}

// RepairOptions are the choices for Repair.
type RepairOptions struct {
	Store      string // the store to repair
	Replica    string // the replica to take good copies from
	Generation int    // 0: every generation of Store
	Progress   *Progress
	// LockWait bounds the wait for a checkpoint or GC holding either
	// store (default 30 s).
	LockWait time.Duration
}

// RepairResult is what Repair did to one generation.
type RepairResult = store.RepairResult

// Repair verifies the generations of o.Store and heals every damaged or
// missing chunk, and a damaged manifest, from o.Replica, checking each
// copy against its hash before writing it; a generation the store lacks
// is copied from the replica when named. What stays damaged (in both
// copies) is reported in the results, not as an error. It holds the
// store's exclusive lock and the replica's shared lock meanwhile.
func Repair(ctx context.Context, o RepairOptions) ([]RepairResult, error) {
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	rep, err := store.Open(o.Replica)
	if err != nil {
		return nil, fmt.Errorf("replica: %w", err)
	}
	if rep.Dir == st.Dir {
		return nil, fmt.Errorf("%w: %s", ErrSameStore, st.Dir)
	}
	st.Progress = o.Progress
	wait := o.LockWait
	if wait == 0 {
		wait = store.DefaultLockWait
	}
	lctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	unlock, err := st.Lock(lctx, true)
	if err != nil {
		return nil, err
	}
	defer unlock()
	unlockRep, err := rep.Lock(lctx, false)
	if err != nil {
		return nil, fmt.Errorf("replica: %w", err)
	}
	defer unlockRep()
	gens := []int{o.Generation}
	if o.Generation == 0 {
		if gens, err = st.Generations(); err != nil {
			return nil, err
		}
	}
	out := []RepairResult{}
	for _, g := range gens {
		out = append(out, st.Repair(ctx, rep, g))
	}
	return out, ctx.Err()
}

// GCOptions are the choices for GC.
type GCOptions struct {
	Store string
	// Keep, when above 0, first removes all but the newest Keep generations.
	Keep int
	// Repack rewrites every pack holding unused bytes, merges small packs,
	// and packs the chunk files of a store an older cryo wrote (converting
	// it); without it GC repacks only mostly unused packs (store.GCOptions).
	Repack bool
	// PackSize bounds the packs GC writes as CheckpointOptions.PackSize
	// does (0: DefaultPackSize); it also decides which packs are small
	// enough (below a quarter of it) to be merged.
	PackSize int64
	// LockWait bounds the wait for a checkpoint or restore using the store
	// (default 5 min).
	LockWait time.Duration
}

// GCResult says what GC removed and repacked.
type GCResult struct {
	store.GCResult
	RemovedGenerations []int `json:"removed_generations,omitempty"`
}

// GC removes what a killed writer left in the store's staging area, the
// generations beyond o.Keep, and the chunks no committed generation
// references. It holds the store's exclusive lock, so no checkpoint or
// restore runs meanwhile.
func GC(ctx context.Context, o GCOptions) (*GCResult, error) {
	if err := store.CheckPackLimit(o.PackSize); err != nil {
		return nil, fmt.Errorf("gc: %w", err)
	}
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	st.PackLimit = o.PackSize
	wait := o.LockWait
	if wait == 0 {
		wait = 5 * time.Minute
	}
	lctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	unlock, err := st.Lock(lctx, true)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := st.CleanStaging(); err != nil {
		return nil, err
	}
	removed, err := st.Retain(o.Keep)
	if err != nil {
		return nil, err
	}
	res, err := st.GCWith(store.GCOptions{Repack: o.Repack})
	if err != nil {
		return nil, err
	}
	return &GCResult{GCResult: res, RemovedGenerations: removed}, nil
}

// InspectOptions are the choices for Inspect.
type InspectOptions struct {
	Store      string
	Generation int // 0: the newest
}

// Inspection describes a checkpoint from its store alone: process tree,
// command lines, memory, open files and sockets, offload contexts, CRIU's
// dump statistics, storage. It is what `cryo inspect --json` prints.
type Inspection = inspect.Report

// Inspect describes a generation of a store without restoring it. It
// reads the small images only, never the memory pages but for the
// processes' arguments, and writes nothing into the store.
func Inspect(ctx context.Context, o InspectOptions) (*Inspection, error) {
	return inspect.Inspect(ctx, inspect.Options{Store: o.Store, Generation: o.Generation})
}

// RecoverOptions are the choices for Recover.
type RecoverOptions struct {
	Store   string
	Offload *offload.Registry // as in CheckpointOptions
	Logger  *slog.Logger
}

// Recovered is what Recover found and did for one interrupted operation.
type Recovered = offload.Recovered

// Recover puts back to running what a cryo killed half-way left behind in
// the store's intent journals: offload contexts locked or checkpointed,
// processes stopped. It is what every checkpoint and restore of the store
// does first. A journal that could not be finished stays, and the error
// says why; the results list every journal handled.
func Recover(ctx context.Context, o RecoverOptions) ([]Recovered, error) {
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	reg, done := openOffload(o.Offload, o.Logger)
	defer done()
	rs, err := offload.Recover(ctx, offload.RecoverOptions{Registry: reg, JournalDir: st.JournalDir(), Logger: o.Logger})
	if rs == nil {
		rs = []Recovered{}
	}
	return rs, err
}

// GPUStatus is what a node offers for checkpointing GPU jobs: its NVIDIA
// driver, GPUs and the processes on them, and whether the driver's
// checkpoint API (and restore onto other GPUs) is there.
type GPUStatus = cuda.Status

// GPUs describes this node's GPUs as the offload drivers reg sees them (nil
// opens them for the call). A node without an NVIDIA driver has none: that
// is reported in the status, not as an error.
func GPUs(reg *offload.Registry) GPUStatus {
	reg, done := openOffload(reg, nil)
	defer done()
	return drivers.Status(reg)
}

// RunState returns the state `cryo run` last recorded in the store at dir:
// "running", "stopped" (checkpointed and stopped, e.g. for a requeue),
// "completed", "failed", ...; "" when cryo run never ran there. A later
// `cryo run` on the store resumes unless the state is completed or failed.
func RunState(dir string) (string, error) {
	p := filepath.Join(monitor.RunDir(dir), monitor.RunStateFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	rs, err := monitor.ParseRunState(b)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return string(rs.State), nil
}

// MigrateOptions are the choices for Migrate.
type MigrateOptions struct {
	// Store is the store of a job that `cryo run` supervises here (its
	// control socket is STORE/run/control.sock), or Socket that socket.
	Store  string
	Socket string
	// To is the destination, host:port, where `cryo run --receive` waits
	// with the same Key file (see NewKey).
	To  string
	Key string
	// MaxRounds bounds the pre-copy rounds (0: 8); NoPrecopy stops the job
	// at once and copies all of it (stop and copy).
	MaxRounds int
	NoPrecopy bool
}

// MigrateResult describes a migration: rounds, bytes sent, downtime.
type MigrateResult = migrate.Result

// ErrRolledBack means a migration failed and the job runs on here, with
// nothing lost.
var ErrRolledBack = migrate.ErrRolledBack

// Migrate moves a running job to another node while it runs: pre-copy
// rounds copy its memory, then it stops for the rest, and it runs on at
// the destination. The job is held stopped here, never killed, until the
// destination says it runs there; if the destination fails at any point,
// the job resumes here (the error then matches ErrRolledBack, and the
// result, when not nil, says how far it got). It needs a job in
// namespaces of its own (cryo run's default where the node allows it).
func Migrate(ctx context.Context, o MigrateOptions) (*MigrateResult, error) {
	sock := o.Socket
	if sock == "" {
		if o.Store == "" {
			return nil, errors.New("migrate: no store or control socket given")
		}
		sock = filepath.Join(monitor.RunDir(o.Store), "control.sock")
	}
	if o.To == "" || o.Key == "" {
		return nil, errors.New("migrate: a destination and a key file are needed")
	}
	key, err := filepath.Abs(o.Key)
	if err != nil {
		return nil, err
	}
	if _, err := wire.LoadKey(key); err != nil {
		return nil, err // before the job is asked anything
	}
	resp, err := monitor.Call(ctx, sock, monitor.Request{Op: "migrate",
		Migrate: &monitor.MigrateRequest{To: o.To, Key: key, MaxRounds: o.MaxRounds, NoPrecopy: o.NoPrecopy}})
	if err != nil {
		if resp != nil {
			return resp.Migration, &migrateError{msg: resp.Error, rolledBack: resp.RolledBack}
		}
		return nil, err
	}
	return resp.Migration, nil
}

// migrateError is a failed migration as the supervisor reported it.
type migrateError struct {
	msg        string
	rolledBack bool
}

func (e *migrateError) Error() string { return e.msg }

func (e *migrateError) Is(target error) bool { return e.rolledBack && target == ErrRolledBack }

// NewKey writes a fresh pre-shared key for migrations to path (mode 0600;
// an existing file is refused). Copy it to the destination's user, who
// names it with --key.
func NewKey(path string) error { return wire.NewKey(path) }
