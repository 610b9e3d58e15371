package cryo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/monitor"
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
	// ErrNotSlurm means the environment is not that of a Slurm job or hook.
	ErrNotSlurm = errors.New("not in a Slurm job (SLURM_JOB_ID is not set)")
)

// CheckCache is where a passing `criu check` is remembered, so that not
// every checkpoint pays for it (the directory the CLI uses too).
const CheckCache = "/run/cryo"

// CheckpointOptions are the choices for one checkpoint.
type CheckpointOptions struct {
	Store string // the job's store; created if missing
	PID   int    // root of the process tree to checkpoint
	// Stop ends the tree once its checkpoint is committed. Until then the
	// tree is held stopped, so if storing fails it simply resumes.
	Stop bool
	// Keep retains at most this many generations (0 keeps all).
	Keep int
	// CRIU is the CRIU binary; "" means $CRYO_CRIU, then criu on PATH.
	CRIU string
	// WorkDir is where images wait between CRIU and the store; "" picks
	// RAM (/dev/shm) when it has room.
	WorkDir string
	// LockWait bounds the wait for another writer of the store (default 30 s).
	LockWait time.Duration
	// Replica is a second store directory that gets a copy of the
	// generation, committed before the store's. A failing replica does not
	// fail the checkpoint: CheckpointResult.ReplicaError says why the copy
	// is missing.
	Replica string
	Logger  *slog.Logger
}

// CheckpointResult describes a committed generation.
type CheckpointResult struct {
	Generation int           `json:"generation"`
	Store      string        `json:"store"`
	Processes  int           `json:"processes"`
	Frozen     time.Duration `json:"frozen_ns"`  // how long the job could not run
	Durable    time.Duration `json:"durable_ns"` // start until the generation was committed
	RawBytes   int64         `json:"raw_bytes"`  // image bytes before compression
	NewBytes   int64         `json:"new_bytes"`  // compressed bytes this generation added
	Stopped    bool          `json:"stopped"`
	Removed    []int         `json:"removed,omitempty"` // generations dropped by Keep
	// ReplicaError says why the replica did not get a copy (the generation
	// is committed in Store only).
	ReplicaError string `json:"replica_error,omitempty"`
}

// Checkpoint takes a consistent snapshot of the process tree rooted at
// o.PID and commits it as a new generation of o.Store. A failed checkpoint
// leaves the tree running as it was and the older generations untouched.
// It needs root (CRIU).
func Checkpoint(ctx context.Context, o CheckpointOptions) (*CheckpointResult, error) {
	bin, err := criu.Locate(o.CRIU, os.Getenv)
	if err != nil {
		return nil, err
	}
	res, err := checkpoint.Take(ctx, checkpoint.Options{
		Store: o.Store, PID: o.PID, Kill: o.Stop, CRIU: bin, WorkDir: o.WorkDir, Keep: o.Keep,
		LockWait: o.LockWait, CheckCache: CheckCache, Replica: o.Replica, Logger: o.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint of pid %d into %s: %w", o.PID, o.Store, err)
	}
	return &CheckpointResult{Generation: res.Generation, Store: res.Store, Processes: res.Processes,
		Frozen: res.Frozen, Durable: res.Durable, RawBytes: res.RawBytes, NewBytes: res.NewBytes,
		Stopped: res.Killed, Removed: res.Removed, ReplicaError: res.ReplicaError}, nil
}

// RestoreOptions are the choices for one restore.
type RestoreOptions struct {
	Store string
	// Generation to restore; 0 means the newest one that verifies, falling
	// back to older generations when a newer one is damaged.
	Generation int
	CRIU       string // as in CheckpointOptions
	WorkDir    string // where images are materialized; "" picks RAM when it has room
	// PIDWait bounds the wait for a dying process that still holds one of
	// the job's PIDs (default 10 s); a live holder fails at once with
	// ErrPIDInUse.
	PIDWait time.Duration
	// Child makes the restored root a child of the calling process, which
	// must then wait for it; otherwise it is restored detached, in a
	// session of its own.
	Child bool
	// Replica is a replica of the store: damaged chunks or a damaged
	// manifest are healed from it before any process starts.
	Replica string
	Logger  *slog.Logger
}

// RestoreResult describes a restored job.
type RestoreResult struct {
	PID        int           `json:"pid"` // the restored root
	Generation int           `json:"generation"`
	Processes  int           `json:"processes"`
	Took       time.Duration `json:"took_ns"`
	// Skipped lists the newer generations that were damaged and passed
	// over (only when Generation was 0).
	Skipped []string `json:"skipped,omitempty"`
	// Healed lists the chunks healed from the replica.
	Healed []string `json:"healed,omitempty"`
}

// Restore brings a job back from its store. Every chunk is verified before
// any process is created, so a damaged generation starts nothing; with
// Generation 0 it is passed over (and named in Skipped) for the next older
// one. Other failures (a PID in use, CRIU refusing) are returned at once.
// It needs root (CRIU).
func Restore(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	bin, err := criu.Locate(o.CRIU, os.Getenv)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	// The fallback is restore's, the same that `cryo restore --fallback` uses.
	res, err := restore.Restore(ctx, restore.Options{
		Store: o.Store, Generation: o.Generation, CRIU: bin, WorkDir: o.WorkDir, PIDWait: o.PIDWait,
		Sibling: o.Child, CheckCache: CheckCache, Replica: o.Replica, Fallback: o.Generation == 0, Logger: o.Logger,
	})
	if err != nil {
		if o.Generation != 0 {
			return nil, fmt.Errorf("restore generation %d of %s: %w", o.Generation, o.Store, err)
		}
		return nil, err
	}
	out := &RestoreResult{PID: res.PID, Generation: res.Generation, Processes: res.Processes, Took: time.Since(t0)}
	for _, s := range res.Skipped {
		out.Skipped = append(out.Skipped, s.String())
	}
	for _, p := range res.Healed {
		out.Healed = append(out.Healed, p.String())
	}
	return out, nil
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
// It takes the store's shared lock, so it waits (up to 30 s) while a
// checkpoint is being committed.
func List(dir string) ([]Generation, error) {
	st, err := store.Open(dir)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	unlock, err := st.Lock(ctx, false)
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

// Verification is the outcome of verifying one generation.
type Verification struct {
	Generation int      `json:"generation"`
	Intact     bool     `json:"intact"`
	Problems   []string `json:"problems,omitempty"` // one per bad chunk or file
}

// Verify re-hashes every chunk of generation gen of the store at dir (every
// generation when gen is 0) and says what is damaged. The error is only for
// failing to verify at all; damage is reported in the results.
func Verify(ctx context.Context, dir string, gen int) ([]Verification, error) {
	st, err := store.Open(dir)
	if err != nil {
		return nil, err
	}
	unlock, err := st.Lock(ctx, false)
	if err != nil {
		return nil, err
	}
	defer unlock()
	gens := []int{gen}
	if gen == 0 {
		if gens, err = st.Generations(); err != nil {
			return nil, err
		}
	}
	out := []Verification{}
	for _, g := range gens {
		v := Verification{Generation: g}
		m, err := st.ReadManifest(g)
		if err != nil {
			v.Problems = []string{err.Error()}
		} else {
			for _, p := range st.Verify(ctx, m) {
				v.Problems = append(v.Problems, p.String())
			}
		}
		v.Intact = len(v.Problems) == 0
		out = append(out, v)
	}
	return out, ctx.Err()
}

func discard(l *slog.Logger) *slog.Logger {
	if l != nil {
		return l
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// RunState returns the state `cryo run` last recorded in the store at dir:
// "running", "stopped" (checkpointed and stopped, e.g. for a requeue),
// "completed", "failed", ...; "" when cryo run never ran there. A later
// `cryo run` on the store resumes unless the state is completed or failed.
func RunState(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(monitor.RunDir(dir), "state.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var rs struct {
		State string `json:"state"`
	}
	if err := json.Unmarshal(b, &rs); err != nil {
		return "", fmt.Errorf("%s: %w", filepath.Join(monitor.RunDir(dir), "state.json"), err)
	}
	return rs.State, nil
}
