package cryo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/monitor"
	"golang.org/x/sys/unix"
)

// HookOptions configure SlurmProlog and SlurmEpilog.
type HookOptions struct {
	// Root is the store root; "" means the job's DefaultStoreRoot (its
	// working directory), which must then be owned by the job's user. A
	// configured root that does not exist is created (root-owned, 0711).
	Root string
	// KeepOnSuccess keeps the store of a job that completed successfully;
	// by default the Epilog deletes it.
	KeepOnSuccess bool
	// LeaveOrphans skips ending processes left over from earlier runs of
	// the job (by default both hooks end them: see SlurmEpilog).
	LeaveOrphans bool
	// GPUInfo is where the NVIDIA driver describes the node's GPUs
	// (default /proc/driver/nvidia/gpus).
	GPUInfo string
	Logger  *slog.Logger
}

// HookReport says what a hook found and did.
type HookReport struct {
	Hook    string   `json:"hook"` // "prolog" or "epilog"
	Job     SlurmJob `json:"job"`
	Store   string   `json:"store,omitempty"`
	Created bool     `json:"created,omitempty"` // the prolog made the store
	// Chowned is set when the prolog gave an existing root-owned store
	// to the job's user.
	Chowned bool `json:"chowned,omitempty"`
	// Orphans are the processes of earlier runs of the job that were ended.
	Orphans []Orphan `json:"orphans,omitempty"`
	// Staging counts what the epilog removed from the store's staging/.
	Staging int `json:"staging_removed,omitempty"`
	// RunState is what `cryo run` last recorded in the store ("" if it
	// never ran there), and Generations the committed generations.
	RunState    string `json:"run_state,omitempty"`
	Generations []int  `json:"generations,omitempty"`
	Removed     bool   `json:"removed,omitempty"` // the epilog deleted the store
	Why         string `json:"why,omitempty"`     // why the store was kept or removed
	GPUs        []GPU  `json:"node_gpus,omitempty"`
}

// Orphan is a process that was ended because it belonged to the job.
type Orphan struct {
	PID  int    `json:"pid"`
	Comm string `json:"comm"`
}

// GPU is one GPU of the node, as the NVIDIA driver describes it.
type GPU struct {
	Minor int    `json:"minor"` // /dev/nvidia<minor>
	UUID  string `json:"uuid,omitempty"`
	Bus   string `json:"bus,omitempty"`
	Model string `json:"model,omitempty"`
}

// historyName is the file, under <store>/slurm/, where every hook run
// appends one JSON line: which node and GPUs each run of the job had, and
// what the epilog did.
const historyName = "history.jsonl"

// SlurmProlog prepares a job's store before the job starts (Slurm's
// Prolog, as root): it ends processes left over from earlier runs of the
// job, so that a restore finds the job's PIDs free; creates the store
// (root/cryo-<id>, 0700) owned by the job's user, or gives an existing
// root-owned one to the user; and records the node and its GPUs in
// <store>/slurm/history.jsonl. It never follows a symbolic link in the
// store's place and refuses a store or root owned by another user. The
// report is filled as far as the hook got, also when it returns an error.
func SlurmProlog(ctx context.Context, job SlurmJob, o HookOptions) (*HookReport, error) {
	log, rep, errs := startHook(ctx, "prolog", job, o)
	if job.UID < 0 {
		return rep, errors.Join(append(errs, errors.New("SLURM_JOB_UID is not set: cannot give the store to the job's user"))...)
	}
	rootf, dir, err := openRoot(job, o.Root, true)
	if err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	defer rootf.Close()
	rep.Store = dir
	name := filepath.Base(dir)
	fd, err := unix.Openat(int(rootf.Fd()), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		if err = unix.Mkdirat(int(rootf.Fd()), name, 0o700); err == nil || errors.Is(err, unix.EEXIST) {
			rep.Created = err == nil
			fd, err = unix.Openat(int(rootf.Fd()), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w (a symbolic link or file in its place is refused)", dir, err))...)
	}
	sf := os.NewFile(uintptr(fd), dir)
	defer sf.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	// Through /proc/self/fd the store is reached by the directory we
	// opened, whatever is renamed in the user's root meanwhile.
	at := fdPath(fd)
	switch {
	case rep.Created:
		// Still root's and 0700: nobody else can meddle with it while the
		// layout is made, then everything is handed to the user at once.
		if _, err := store.Create(at, "cryo "+checkpoint.Version); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w", dir, err))...)
		}
		if err := chownTree(fd, job.UID, job.GID); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: give to uid %d: %w", dir, job.UID, err))...)
		}
		log.Debug("created the job's store", "store", dir, "uid", job.UID, "gid", job.GID)
	case int(st.Uid) == job.UID:
		log.Debug("the job's store exists", "store", dir)
	case st.Uid == 0:
		// Made by a `cryo run` (as root) before a prolog ran: hand over the
		// directory itself; its contents stay cryo's.
		if err := unix.Fchown(fd, job.UID, job.GID); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("store %s: give to uid %d: %w", dir, job.UID, err))...)
		}
		rep.Chowned = true
		log.Debug("gave the existing store to the job's user", "store", dir, "uid", job.UID)
	default:
		return rep, errors.Join(append(errs, fmt.Errorf("store %s belongs to uid %d, not to the job's user (uid %d): left alone", dir, st.Uid, job.UID))...)
	}
	if err := unix.Fchmod(fd, 0o700); err != nil {
		errs = append(errs, fmt.Errorf("store %s: chmod 0700: %w", dir, err))
	}
	if !rep.Created {
		// A store the prolog did not make must still be one (or empty).
		if _, err := store.Create(at, "cryo "+checkpoint.Version); err != nil {
			errs = append(errs, fmt.Errorf("store %s: %w", dir, err))
		}
	}
	gpuDir := o.GPUInfo
	if gpuDir == "" {
		gpuDir = "/proc/driver/nvidia/gpus"
	}
	rep.GPUs, _ = NodeGPUs(gpuDir)
	errs = append(errs, appendHistory(fd, job, rep))
	return rep, errors.Join(errs...)
}

// SlurmEpilog tidies a job's store after the job ends on this node
// (Slurm's Epilog, as root). It ends processes the job left behind
// (those whose environment names this job and cluster: a job-init
// orphaned by a killed cryo, the remains of a failed restore), removes
// staging leftovers, keeps committed generations for a requeue, and
// deletes the store when the job completed successfully: `cryo run`
// recorded it as completed and the batch script exited 0. A store cryo
// never ran in (only the prolog's) is deleted too. Anything else is kept,
// and HookReport.Why says why.
func SlurmEpilog(ctx context.Context, job SlurmJob, o HookOptions) (*HookReport, error) {
	log, rep, errs := startHook(ctx, "epilog", job, o)
	rootf, dir, err := openRoot(job, o.Root, false)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			rep.Why = "no store root: nothing to tidy"
			return rep, errors.Join(errs...)
		}
		return rep, errors.Join(append(errs, err)...)
	}
	defer rootf.Close()
	rep.Store = dir
	name := filepath.Base(dir)
	fd, err := unix.Openat(int(rootf.Fd()), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		rep.Why = "the job has no store"
		return rep, errors.Join(errs...)
	}
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w (a symbolic link or file in its place is refused)", dir, err))...)
	}
	sf := os.NewFile(uintptr(fd), dir)
	defer sf.Close()
	var fst unix.Stat_t
	if err := unix.Fstat(fd, &fst); err != nil {
		return rep, errors.Join(append(errs, err)...)
	}
	if fst.Uid != 0 && job.UID >= 0 && int(fst.Uid) != job.UID {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s belongs to uid %d, not to the job's user (uid %d): left alone", dir, fst.Uid, job.UID))...)
	}
	st, err := store.Open(fdPath(fd))
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w", dir, err))...)
	}
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	unlock, err := st.Lock(lctx, true)
	cancel()
	if err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("store %s: %w; a cryo still works on it, left alone", dir, err))...)
	}
	defer unlock()
	n, err := cleanStaging(fd)
	rep.Staging = n
	if err != nil {
		errs = append(errs, fmt.Errorf("store %s: clean staging: %w", dir, err))
	}
	rep.Generations, err = st.Generations()
	if err != nil {
		errs = append(errs, err)
	}
	state, exit := readRunState(fd)
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
		// Removed by the directory we opened as root, not by a path the
		// user could redirect meanwhile.
		unlock()
		if err := os.RemoveAll(filepath.Join(fdPath(int(rootf.Fd())), name)); err != nil {
			return rep, errors.Join(append(errs, fmt.Errorf("remove store %s: %w", dir, err))...)
		}
		rep.Removed = true
		log.Debug("removed the job's store", "store", dir, "why", rep.Why)
		return rep, errors.Join(errs...)
	}
	log.Debug("kept the job's store", "store", dir, "why", rep.Why)
	errs = append(errs, appendHistory(fd, job, rep))
	return rep, errors.Join(errs...)
}

// openRoot opens the store root and returns it with the job's store path.
// The default root (the job's working directory) must belong to the job's
// user; a configured one to root or the job's user. With create, a
// missing configured root is made.
func openRoot(job SlurmJob, root string, create bool) (*os.File, string, error) {
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
	f, err := os.OpenFile(root, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", fmt.Errorf("store root: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, "", err
	}
	owner := int(st.Uid)
	if (configured && owner != 0 && owner != job.UID) || (!configured && owner != job.UID) {
		f.Close()
		what := "the job's working directory"
		if configured {
			what = "store root"
		}
		return nil, "", fmt.Errorf("%s %s belongs to uid %d, not to the job's user (uid %d): no store prepared there (set CRYO_STORE_ROOT)", what, root, owner, job.UID)
	}
	return f, dir, nil
}

func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// chownTree gives the directory fd and everything below it to uid:gid,
// never following a symbolic link. For a tree only root could write to
// so far (one the prolog just made).
func chownTree(fd, uid, gid int) error {
	ents, err := readDirAt(fd)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if e.IsDir() {
			sub, err := unix.Openat(fd, e.Name(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", e.Name(), err))
				continue
			}
			errs = append(errs, chownTree(sub, uid, gid))
			unix.Close(sub)
			continue
		}
		if err := unix.Fchownat(fd, e.Name(), uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.Name(), err))
		}
	}
	if err := unix.Fchown(fd, uid, gid); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// readDirAt lists the directory fd (through a descriptor of its own, so
// fd's offset is left alone).
func readDirAt(fd int) ([]os.DirEntry, error) {
	own, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(own), ".")
	defer f.Close()
	return f.ReadDir(-1)
}

// cleanStaging removes what is in <store>/staging but the intent journals:
// work a killed cryo left behind. Like Store.CleanStaging, but it will not
// follow staging/ if the job's user replaced it with a symbolic link.
func cleanStaging(storeFD int) (int, error) {
	fd, err := unix.Openat(storeFD, "staging", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("staging: %w", err)
	}
	f := os.NewFile(uintptr(fd), "staging")
	defer f.Close()
	ents, err := readDirAt(fd)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, e := range ents {
		if e.Name() == "journal" {
			continue // intent journals: recovery's business, as in Store.CleanStaging
		}
		errs = append(errs, os.RemoveAll(filepath.Join(fdPath(fd), e.Name())))
		n++
	}
	return n, errors.Join(errs...)
}

// readRunState reads the state `cryo run` recorded in <store>/run/state.json
// ("" when there is none), without following symbolic links.
func readRunState(storeFD int) (string, *int) {
	run, err := unix.Openat(storeFD, "run", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil
	}
	defer unix.Close(run)
	fd, err := unix.Openat(run, "state.json", unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil
	}
	f := os.NewFile(uintptr(fd), "state.json")
	defer f.Close()
	var rs struct {
		State    string `json:"state"`
		ExitCode *int   `json:"exit_code"`
	}
	if err := json.NewDecoder(f).Decode(&rs); err != nil {
		return "unreadable", nil
	}
	return rs.State, rs.ExitCode
}

// appendHistory adds one line about this hook run to
// <store>/slurm/history.jsonl, owned by the job's user.
func appendHistory(storeFD int, job SlurmJob, rep *HookReport) error {
	if err := unix.Mkdirat(storeFD, "slurm", 0o700); err == nil {
		_ = unix.Fchownat(storeFD, "slurm", job.UID, job.GID, unix.AT_SYMLINK_NOFOLLOW)
	}
	dir, err := unix.Openat(storeFD, "slurm", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	defer unix.Close(dir)
	fd, err := unix.Openat(dir, historyName, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	f := os.NewFile(uintptr(fd), historyName)
	defer f.Close()
	if job.UID >= 0 {
		_ = unix.Fchown(fd, job.UID, job.GID)
	}
	rec := struct {
		Time time.Time `json:"time"`
		*HookReport
	}{time.Now().UTC(), rep}
	b, _ := json.Marshal(rec)
	_, err = f.Write(append(b, '\n'))
	return err
}

// killJobOrphans ends every process whose environment says it belongs to
// this job (SLURM_JOB_ID, and SLURM_CLUSTER_NAME when known), except the
// caller and its ancestors, and waits (up to 10 s) until they are dead. A
// hook runs when the job has no legitimate process on the node: before it
// starts, or after Slurm ended it. What is found then was orphaned (for
// example a job-init whose cryo was killed, or the remains of a failed
// restore) and would hold PIDs a restore needs.
func killJobOrphans(ctx context.Context, job SlurmJob, log *slog.Logger) ([]Orphan, error) {
	if !validJobID(job.ID) {
		return nil, nil
	}
	want := [][]byte{[]byte("SLURM_JOB_ID=" + job.ID)}
	if job.Cluster != "" {
		want = append(want, []byte("SLURM_CLUSTER_NAME="+job.Cluster))
	}
	skip := map[int]bool{0: true, 1: true}
	for p := os.Getpid(); p > 1 && !skip[p]; {
		skip[p] = true
		st, err := proc.ReadStat(p)
		if err != nil {
			break
		}
		p = st.PPID
	}
	var found []Orphan
	// An orphan may fork while it is being looked for: scan again until a
	// scan finds nothing new.
	for range 5 {
		n, err := killJobScan(want, skip, log)
		if err != nil {
			return found, err
		}
		if len(n) == 0 {
			break
		}
		found = append(found, n...)
	}
	sort.Slice(found, func(i, k int) bool { return found[i].PID < found[k].PID })
	// Dead is enough: a zombie's parent (init, mostly) frees its PID, and a
	// restore waits for that itself.
	deadline := time.Now().Add(10 * time.Second)
	var errs []error
	for _, o := range found {
		for proc.Live(o.PID) && time.Now().Before(deadline) && ctx.Err() == nil {
			var ws unix.WaitStatus
			_, _ = unix.Wait4(o.PID, &ws, unix.WNOHANG, nil) // in case it is ours
			time.Sleep(5 * time.Millisecond)
		}
		if proc.Live(o.PID) {
			errs = append(errs, fmt.Errorf("pid %d (%s) of job %s did not end within 10 s", o.PID, o.Comm, job.ID))
		}
	}
	return found, errors.Join(errs...)
}

// killJobScan sends SIGKILL to every process in /proc whose environment
// holds all of want, except those in skip (which it then adds to skip).
//
// A process in the middle of execve shows an empty environment until the
// kernel has built its new stack (about 1 in 15 right after a fork+exec
// returned, measured here), so a process with no environment that is not a
// kernel thread is read again, for up to 127 ms. See readEnviron for the
// other half of that race.
func killJobScan(want [][]byte, skip map[int]bool, log *slog.Logger) ([]Orphan, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pending []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && !skip[pid] {
			pending = append(pending, pid)
		}
	}
	var found []Orphan
	var buf []byte
	for wait := time.Millisecond; len(pending) > 0; wait *= 2 {
		var again []int
		for _, pid := range pending {
			var env []byte
			env, buf, err = readEnviron(pid, buf)
			if err != nil {
				continue // gone, or no memory to read: a zombie, a kernel thread
			}
			if len(env) > 0 {
				skip[pid] = true
				if !hasAll(env, want) {
					continue
				}
			}
			// Only the job's processes, and those whose environment read
			// empty, come this far: the stat of every process is not read.
			st, err := proc.ReadStat(pid)
			if err != nil || st.State == 'Z' || st.State == 'X' || st.Kernel {
				continue // gone, dead, or a kernel thread
			}
			if len(env) == 0 {
				again = append(again, pid)
				continue
			}
			if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
				found = append(found, Orphan{PID: pid, Comm: st.Comm})
				log.Warn("ended a process the job left behind", "pid", pid, "comm", st.Comm)
			}
		}
		if wait > 64*time.Millisecond {
			break // an empty environment that stays empty: env -i, say
		}
		pending = again
		if len(pending) > 0 {
			time.Sleep(wait)
		}
	}
	return found, nil
}

// readEnviron reads /proc/<pid>/environ in one read(2) into buf, grown as
// needed (to 16 MiB, beyond any exec's limit on a normal stack), and
// returns the environment and the buffer to use next time.
//
// One read is one look at one address space. A file opened before an exec
// reads the old one, and each further read(2) gives up once it is gone:
// reading in pieces, as os.ReadFile does, can return the head of the old
// environment and then end, which looks like a complete environment
// without the variables at its end.
func readEnviron(pid int, buf []byte) (env, next []byte, err error) {
	if len(buf) == 0 {
		buf = make([]byte, 64<<10)
	}
	for {
		fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/environ", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, buf, err
		}
		n, err := unix.Read(fd, buf)
		for err == unix.EINTR {
			n, err = unix.Read(fd, buf)
		}
		unix.Close(fd)
		if err != nil {
			return nil, buf, err
		}
		if n < len(buf) || len(buf) >= 16<<20 {
			return buf[:n], buf, nil
		}
		buf = make([]byte, 4*len(buf))
	}
}

// hasAll reports whether a NUL-separated environment holds every entry.
func hasAll(env []byte, want [][]byte) bool {
	n := 0
	for _, kv := range bytes.Split(env, []byte{0}) {
		for _, w := range want {
			if bytes.Equal(kv, w) {
				n++
			}
		}
	}
	return n >= len(want)
}

// NodeGPUs lists the node's NVIDIA GPUs from the driver's description in
// dir (normally /proc/driver/nvidia/gpus/<bus>/information); none when the
// driver is not loaded.
func NodeGPUs(dir string) ([]GPU, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var gpus []GPU
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "information"))
		if err != nil {
			continue
		}
		g := GPU{Minor: -1, Bus: e.Name()}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			v = strings.TrimSpace(v)
			switch strings.TrimSpace(k) {
			case "Model":
				g.Model = v
			case "GPU UUID":
				g.UUID = v
			case "Bus Location":
				g.Bus = v
			case "Device Minor":
				g.Minor = atoiOr(v, -1)
			}
		}
		gpus = append(gpus, g)
	}
	sort.Slice(gpus, func(i, k int) bool { return gpus[i].Minor < gpus[k].Minor })
	return gpus, nil
}

// startHook begins a prolog or epilog: its report, and the leftover
// processes of earlier runs of the job ended (unless LeaveOrphans).
func startHook(ctx context.Context, hook string, job SlurmJob, o HookOptions) (*slog.Logger, *HookReport, []error) {
	log := discard(o.Logger)
	rep := &HookReport{Hook: hook, Job: job}
	var errs []error
	if !o.LeaveOrphans {
		var err error
		rep.Orphans, err = killJobOrphans(ctx, job, log)
		errs = append(errs, err)
	}
	return log, rep, errs
}
