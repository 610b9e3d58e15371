package slurm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// Orphan is a process that was ended because it belonged to the job.
type Orphan struct {
	PID  int    `json:"pid"`
	Comm string `json:"comm"`
}

// killJobOrphans ends every process whose environment says it belongs to
// this job (SLURM_JOB_ID, and SLURM_CLUSTER_NAME when known), except the
// caller and its ancestors, and waits (up to 10 s) until they are dead. A
// hook runs when the job has no legitimate process on the node: before it
// starts, or after Slurm ended it. What is found then was orphaned (for
// example a job-init whose cryo was killed, or the remains of a failed
// restore) and would hold PIDs a restore needs.
func killJobOrphans(ctx context.Context, job Job, log *slog.Logger) ([]Orphan, error) {
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

// killJobScan sends SIGKILL to every process whose environment holds all
// of want, except those in skip (which it then adds to skip).
//
// A process in the middle of execve shows an empty environment until the
// kernel has built its new stack (about 1 in 15 right after a fork+exec
// returned, measured here), so a process with no environment that is not a
// kernel thread is read again, for up to 127 ms. See proc.ReadEnviron for
// the other half of that race.
func killJobScan(want [][]byte, skip map[int]bool, log *slog.Logger) ([]Orphan, error) {
	pids, err := proc.PIDs()
	if err != nil {
		return nil, err
	}
	var pending []int
	for _, pid := range pids {
		if !skip[pid] {
			pending = append(pending, pid)
		}
	}
	var found []Orphan
	var buf []byte
	for wait := time.Millisecond; len(pending) > 0; wait *= 2 {
		var again []int
		for _, pid := range pending {
			var env []byte
			env, buf, err = proc.ReadEnviron(pid, buf)
			if err != nil {
				continue // gone, or no memory to read: a zombie, a kernel thread
			}
			if len(env) > 0 {
				skip[pid] = true
				if !proc.EnvHasAll(env, want) {
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
