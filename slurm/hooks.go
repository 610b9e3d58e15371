package slurm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/safefs"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/monitor"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
	"golang.org/x/sys/unix"
)

// HookOptions configure Prolog and Epilog.
type HookOptions struct {
	// Root is the store root; "" means the job's DefaultStoreRoot (its
	// working directory), which must then be owned by the job's user. A
	// configured root that does not exist is created (root-owned, 0711).
	Root string
	// KeepOnSuccess keeps the store of a job that completed successfully;
	// by default the Epilog deletes it.
	KeepOnSuccess bool
	// LeaveOrphans skips ending processes left over from earlier runs of
	// the job (by default both hooks end them: see Epilog).
	LeaveOrphans bool
	// Offload is the node's offload drivers (offload/drivers.Open), which
	// the Prolog asks for the node's GPUs; nil opens them for the call.
	Offload *offload.Registry
	Logger  *slog.Logger
}

// HookReport says what a hook found and did.
type HookReport struct {
	Hook    string `json:"hook"` // "prolog" or "epilog"
	Job     Job    `json:"job"`
	Store   string `json:"store,omitempty"`
	Created bool   `json:"created,omitempty"` // the prolog made the store
	// Chowned is set when the prolog gave an existing root-owned store
	// to the job's user.
	Chowned bool `json:"chowned,omitempty"`
	// Orphans are the processes of earlier runs of the job that were ended.
	Orphans []Orphan `json:"orphans,omitempty"`
	// Staging counts what the epilog removed from the store's staging/
	// and its unfinished pack files (Store.CleanStaging).
	Staging int `json:"staging_removed,omitempty"`
	// RunState is what `cryo run` last recorded in the store ("" if it
	// never ran there), and Generations the committed generations.
	RunState    string `json:"run_state,omitempty"`
	Generations []int  `json:"generations,omitempty"`
	Removed     bool   `json:"removed,omitempty"` // the epilog deleted the store
	Why         string `json:"why,omitempty"`     // why the store was kept or removed
	// GPUs are the node's GPUs as its offload drivers see them (prolog).
	GPUs []offload.GPU `json:"node_gpus,omitempty"`
}

// historyName is the file, under <store>/slurm/, where every hook run
// appends one JSON line: which node and GPUs each run of the job had, and
// what the epilog did.
const historyName = "history.jsonl"

// Prolog prepares a job's store before the job starts (Slurm's Prolog, as
// root): it ends processes left over from earlier runs of the job, so that
// a restore finds the job's PIDs free; creates the store (root/cryo-<id>,
// 0700) owned by the job's user, or gives an existing root-owned one to
// the user; and records the node and its GPUs in
// <store>/slurm/history.jsonl. It never follows a symbolic link in the
// store's place and refuses a store or root owned by another user. The
// report is filled as far as the hook got, also when it returns an error.
func Prolog(ctx context.Context, job Job, o HookOptions) (*HookReport, error) {
	log, rep, errs := startHook(ctx, "prolog", job, o)
	if job.UID < 0 {
		return rep, errors.Join(append(errs, errors.New("SLURM_JOB_UID is not set: cannot give the store to the job's user"))...)
	}
	root, dir, err := openRoot(job, o.Root, true)
	if err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	defer root.Close()
	rep.Store = dir
	sd, created, err := root.Mkdir(filepath.Base(dir), 0o700)
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w (a symbolic link or file in its place is refused)", dir, err))...)
	}
	defer sd.Close()
	rep.Created = created
	st, err := sd.Stat()
	if err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	// Through its /proc/self/fd name the store is reached by the directory
	// opened here, whatever is renamed in the user's root meanwhile.
	at := sd.Path()
	switch {
	case rep.Created:
		// The directory is the user's; its layout is made as the user, so
		// that root creates nothing in a directory the user can write.
		if err := sd.Chown(job.UID, job.GID); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: give to uid %d: %w", dir, job.UID, err))...)
		}
		if err := asJobUser(job, func() error { _, err := store.Create(at, "cryo "+checkpoint.Version); return err }); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w", dir, err))...)
		}
		log.Debug("created the job's store", "store", dir, "uid", job.UID, "gid", job.GID)
	case int(st.Uid) == job.UID:
		log.Debug("the job's store exists", "store", dir)
	case st.Uid == 0:
		// Made by a `cryo run` (as root) before a prolog ran: hand over the
		// directory itself; its contents stay cryo's.
		if err := sd.Chown(job.UID, job.GID); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: give to uid %d: %w", dir, job.UID, err))...)
		}
		rep.Chowned = true
		log.Debug("gave the existing store to the job's user", "store", dir, "uid", job.UID)
	default:
		return rep, errors.Join(append(errs, fmt.Errorf("store %s belongs to uid %d, not to the job's user (uid %d): left alone", dir, st.Uid, job.UID))...)
	}
	if err := sd.Chmod(0o700); err != nil {
		errs = append(errs, fmt.Errorf("store %s: chmod 0700: %w", dir, err))
	}
	if !rep.Created {
		// A store the prolog did not make must still be one (or empty).
		if err := asJobUser(job, func() error { _, err := store.Create(at, "cryo "+checkpoint.Version); return err }); err != nil {
			errs = append(errs, fmt.Errorf("store %s: %w", dir, err))
		}
	}
	rep.GPUs = nodeGPUs(ctx, o.Offload, log)
	errs = append(errs, appendHistory(sd, job, rep))
	return rep, errors.Join(errs...)
}

// Epilog tidies a job's store after the job ends on this node (Slurm's
// Epilog, as root). It ends processes the job left behind (those whose
// environment names this job and cluster: a job-init orphaned by a killed
// cryo, the remains of a failed restore), removes what a killed cryo left
// in the store (Store.CleanStaging, as the job's user: staging debris and
// unfinished pack files), keeps committed generations for a requeue, and
// deletes the store when the job completed successfully: `cryo run`
// recorded it as completed and the batch script exited 0. A store cryo
// never ran in (only the prolog's) is deleted too. Anything else is kept,
// and HookReport.Why says why.
func Epilog(ctx context.Context, job Job, o HookOptions) (*HookReport, error) {
	log, rep, errs := startHook(ctx, "epilog", job, o)
	root, dir, err := openRoot(job, o.Root, false)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			rep.Why = "no store root: nothing to tidy"
			return rep, errors.Join(errs...)
		}
		return rep, errors.Join(append(errs, err)...)
	}
	defer root.Close()
	rep.Store = dir
	name := filepath.Base(dir)
	sd, err := root.Open(name)
	if errors.Is(err, os.ErrNotExist) {
		rep.Why = "the job has no store"
		return rep, errors.Join(errs...)
	}
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w (a symbolic link or file in its place is refused)", dir, err))...)
	}
	defer sd.Close()
	fst, err := sd.Stat()
	if err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	if fst.Uid != 0 && job.UID >= 0 && int(fst.Uid) != job.UID {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s belongs to uid %d, not to the job's user (uid %d): left alone", dir, fst.Uid, job.UID))...)
	}
	// The store is the user's: it is opened, locked and listed as the user
	// (root creates no lock file in a directory the user can write).
	var (
		st     *store.Store
		unlock func()
	)
	err = asJobUser(job, func() error {
		var err error
		if st, err = store.Open(sd.Path()); err != nil {
			return err
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if unlock, err = st.Lock(lctx, true); err != nil {
			return fmt.Errorf("%w; a cryo still works on it, left alone", err)
		}
		return nil
	})
	if st == nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w", dir, err))...)
	}
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w", dir, err))...)
	}
	defer unlock()
	err = asJobUser(job, func() error {
		var err error
		rep.Staging, err = st.CleanStaging()
		if rep.Staging == 0 && errors.Is(err, fs.ErrNotExist) {
			err = nil // no staging/: nothing was left there
		}
		return err
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("store %s: clean staging: %w", dir, err))
	}
	err = asJobUser(job, func() error {
		var err error
		rep.Generations, err = st.Generations()
		return err
	})
	if err != nil {
		errs = append(errs, err)
	}
	state, exit := readRunState(sd)
	rep.RunState = state
	remove := false
	switch {
	case state == "":
		remove, rep.Why = len(rep.Generations) == 0, "cryo run never ran in this store"
		if !remove {
			rep.Why = "the store holds checkpoints but no run state (made by cryo checkpoint?): kept"
		}
	case state == string(monitor.StateCompleted) && job.Exited != nil && *job.Exited == 0 && (exit == nil || *exit == 0):
		remove, rep.Why = !o.KeepOnSuccess, "the job completed successfully"
		if !remove {
			rep.Why += "; kept as configured"
		}
	case state == string(monitor.StateCompleted):
		rep.Why = "cryo run completed but the batch script "
		if job.Exited == nil {
			rep.Why += "exit code is unknown: kept"
		} else {
			rep.Why += fmt.Sprintf("exited with %d: kept", *job.Exited)
		}
	case state == string(monitor.StateFailed):
		rep.Why = "the job failed: kept for inspection (run/ holds its logs)"
	default:
		rep.Why = fmt.Sprintf("the run is unfinished (state %s): kept for the requeue", state)
		if len(rep.Generations) > 0 {
			rep.Why = fmt.Sprintf("the run is unfinished (state %s): generations %v kept for the requeue", state, rep.Generations)
		}
	}
	if remove {
		// Removed in the root directory opened as root, not by a path the
		// user could redirect meanwhile.
		unlock()
		if err := root.RemoveAll(name); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("remove store %s: %w", dir, err))...)
		}
		rep.Removed = true
		log.Debug("removed the job's store", "store", dir, "why", rep.Why)
		return rep, errors.Join(errs...)
	}
	log.Debug("kept the job's store", "store", dir, "why", rep.Why)
	errs = append(errs, appendHistory(sd, job, rep))
	return rep, errors.Join(errs...)
}

// openRoot opens the store root and returns it with the job's store path.
// The default root (the job's working directory) must belong to the job's
// user; a configured one to root or the job's user. With create, a
// missing configured root is made.
func openRoot(job Job, root string, create bool) (*safefs.Dir, string, error) {
	configured := root != ""
	dir, err := job.Store(root)
	if err != nil {
		return nil, "", err
	}
	root = filepath.Dir(dir)
	if create && configured {
		if err := os.MkdirAll(root, 0o711); err != nil {
			return nil, "", fmt.Errorf("store root %s: %w", root, err)
		}
	}
	d, err := safefs.OpenDir(root)
	if err != nil {
		return nil, "", fmt.Errorf("store root: %w", err)
	}
	st, err := d.Stat()
	if err != nil {
		d.Close()
		return nil, "", err
	}
	owner := int(st.Uid)
	if (configured && owner != 0 && owner != job.UID) || (!configured && owner != job.UID) {
		d.Close()
		what := "the job's working directory"
		if configured {
			what = "store root"
		}
		return nil, "", fmt.Errorf("%s %s belongs to uid %d, not to the job's user (uid %d): no store prepared there (set CRYO_STORE_ROOT)", what, root, owner, job.UID)
	}
	return d, dir, nil
}

// readRunState reads the state `cryo run` recorded in <store>/run/state.json
// ("" when there is none), without following symbolic links.
func readRunState(sd *safefs.Dir) (string, *int) {
	b, err := sd.ReadFileBeneath(filepath.Join(monitor.RunDir("."), monitor.RunStateFile), monitor.MaxRunState)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", nil
		}
		return "unreadable", nil
	}
	rs, err := monitor.ParseRunState(b)
	if err != nil {
		return "unreadable", nil
	}
	return string(rs.State), rs.ExitCode
}

// appendHistory adds one line about this hook run to
// <store>/slurm/history.jsonl, owned by the job's user.
func appendHistory(sd *safefs.Dir, job Job, rep *HookReport) error {
	dir, created, err := sd.Mkdir("slurm", 0o700)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	defer dir.Close()
	if created && job.UID >= 0 {
		_ = dir.Chown(job.UID, job.GID)
	}
	f, err := dir.OpenFile(historyName, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT, 0o600)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	defer f.Close()
	if job.UID >= 0 {
		_ = f.Chown(job.UID, job.GID)
	}
	rec := struct {
		Time time.Time `json:"time"`
		*HookReport
	}{time.Now().UTC(), rep}
	b, _ := json.Marshal(rec)
	_, err = f.Write(append(b, '\n'))
	return err
}

// nodeGPUs lists the node's GPUs as its offload drivers see them (none on
// a node without a driver: its null driver says why, logged).
func nodeGPUs(ctx context.Context, reg *offload.Registry, log *slog.Logger) []offload.GPU {
	if reg == nil {
		reg = drivers.Open(drivers.Config{Logger: log})
		defer reg.Close()
	}
	var gpus []offload.GPU
	for _, d := range reg.Drivers() {
		inv, err := d.Inventory(ctx)
		if err != nil {
			log.Debug("no GPUs of this kind on the node", "kind", d.Kind(), "err", err)
			continue
		}
		gpus = append(gpus, inv.GPUs...)
	}
	sort.SliceStable(gpus, func(i, k int) bool { return gpus[i].Index < gpus[k].Index })
	return gpus
}

// startHook begins a prolog or epilog: its report, and the leftover
// processes of earlier runs of the job ended (unless LeaveOrphans).
func startHook(ctx context.Context, hook string, job Job, o HookOptions) (*slog.Logger, *HookReport, []error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	rep := &HookReport{Hook: hook, Job: job}
	var errs []error
	if !o.LeaveOrphans {
		var err error
		rep.Orphans, err = killJobOrphans(ctx, job, log)
		errs = append(errs, err)
	}
	return log, rep, errs
}

// asJobUser runs fn with the job's user's file-system identity
// (privilege.AsUser), for what a hook does inside the user's store. A job
// of root's own, or one whose user is unknown, runs as it is.
func asJobUser(job Job, fn func() error) error {
	if job.UID <= 0 {
		return fn()
	}
	return privilege.AsUser(job.UID, job.GID, fn)
}
