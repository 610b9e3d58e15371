package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/workdir"
)

// ErrPIDInUse means a PID the job needs is held by a live process.
var ErrPIDInUse = errors.New("pid in use")

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
	Logger     *slog.Logger
}

// Result describes a restored job.
type Result struct {
	PID         int           `json:"pid"`
	Generation  int           `json:"generation"`
	Processes   int           `json:"processes"`
	Materialize time.Duration `json:"materialize_ns"`
	Restore     time.Duration `json:"restore_ns"`
}

// Restore restores a generation of o.Store.
func Restore(ctx context.Context, o Options) (*Result, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	unlock, err := st.Lock(ctx, false)
	if err != nil {
		return nil, err
	}
	defer unlock()

	gen := o.Generation
	if gen == 0 {
		gens, err := st.Generations()
		if err != nil {
			return nil, err
		}
		if len(gens) == 0 {
			return nil, fmt.Errorf("%w: store %s has no checkpoints yet", store.ErrNoGeneration, st.Dir)
		}
		gen = gens[len(gens)-1]
	}
	m, err := st.ReadManifest(gen)
	if err != nil {
		return nil, err
	}
	bin, err := criu.Vet(ctx, o.CRIU, o.CheckCache)
	if err != nil {
		return nil, err
	}
	wait := o.PIDWait
	if wait == 0 {
		wait = 10 * time.Second
	}
	if err := pidsFree(ctx, m, wait, log); err != nil {
		return nil, err
	}

	work, err := workdir.Make(o.WorkDir, filepath.Join(st.Dir, "staging"), m.RawBytes()+16<<20)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	images := filepath.Join(work, "images")
	if err := os.Mkdir(images, 0o700); err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := st.Materialize(ctx, m, images); err != nil {
		return nil, err
	}
	res := &Result{Generation: gen, Processes: len(m.Job.Processes), Materialize: time.Since(t0)}
	log.Debug("materialized", "generation", gen, "bytes", m.RawBytes(), "took", res.Materialize)

	t1 := time.Now()
	pid, err := criu.Restore(ctx, bin, criu.Options{
		ImagesDir: images, WorkDir: work, LogFile: "restore.log",
		RestoreSibling: o.Sibling, RestoreDetached: !o.Sibling,
		TCPEstablished: m.CRIU.TCPEstablished, ShellJob: m.CRIU.ShellJob,
		FileLocks: true, ExtUnixSockets: true,
	}, nil)
	if err != nil {
		var ce *criu.Error
		if errors.As(err, &ce) {
			dst := st.LogPath("restore")
			if b, rerr := os.ReadFile(ce.Log); rerr == nil && os.WriteFile(dst, b, 0o600) == nil {
				ce.Log = dst
			}
		}
		return nil, fmt.Errorf("restore generation %d: %w", gen, err)
	}
	res.PID, res.Restore = pid, time.Since(t1)
	log.Debug("restored", "pid", pid, "took", res.Restore)
	return res, nil
}

// pidsFree checks that every PID and thread ID of the job is free, waiting
// up to wait for ones held by a dying process (a zombie, or one with
// SIGKILL pending); a live holder is refused.
func pidsFree(ctx context.Context, m *store.Manifest, wait time.Duration, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for _, p := range m.Job.Processes {
		ids := append([]int{p.PID}, p.TIDs...)
		for _, id := range ids {
			if !proc.Exists(id) {
				continue
			}
			if !dying(id) {
				st, _ := proc.ReadStat(id)
				return fmt.Errorf("%w: pid %d, which the checkpointed %q needs, is held by a live process %q (is the job still running?)",
					ErrPIDInUse, id, p.Comm, st.Comm)
			}
			log.Debug("waiting for a dying process to release its pid", "pid", id)
			if err := proc.WaitGone(ctx, id); err != nil {
				return fmt.Errorf("%w: pid %d is still held by a dying process after %s", ErrPIDInUse, id, wait)
			}
		}
	}
	return nil
}

// dying reports whether id is a zombie, dead, or has SIGKILL pending.
func dying(id int) bool {
	st, err := proc.ReadStat(id)
	if err != nil {
		return true
	}
	if st.State == 'Z' || st.State == 'X' {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(id) + "/status")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err == nil && mask&(1<<8) != 0 { // SIGKILL is signal 9: bit 8
			return true
		}
	}
	return false
}
