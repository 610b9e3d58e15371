package monitor

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// Ending a job, and only the job. A process is signalled only when it is
// the job's (below job-init, or adopted by the supervisor from the job)
// and still the very process that was found: it is pinned with a pidfd
// and its start time checked, so a PID that was freed and taken by
// another process meanwhile is never hit. This holds as well when job-init
// is the init of a PID namespace of the job's own: there its descendants
// are the namespace, and ending job-init ends them all.

// errNotSame means the PID now names another process than the one found.
var errNotSame = errors.New("the pid was taken by another process")

// signalSame sends sig to pid if it is still the process that started at
// start (in clock ticks after boot, from its stat).
func signalSame(pid int, start uint64, sig syscall.Signal) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return err // ESRCH: gone
	}
	defer unix.Close(fd)
	// The pidfd holds the process found now; if it is the one that was
	// read, it has the start time read.
	st, err := proc.ReadStat(pid)
	if err != nil || st.StartTime != start {
		return errNotSame
	}
	return unix.PidfdSendSignal(fd, sig, nil, 0)
}

// procIsOurs reports whether /proc shows this process's PID namespace: in
// a PID namespace of the job's own, only a /proc mounted there does (the
// node's would show the node's processes under the job's PIDs).
func procIsOurs() bool {
	self, err := os.Readlink("/proc/self")
	return err == nil && self == strconv.Itoa(os.Getpid())
}

// signalBelow sends sig to every live descendant of root found in one
// reading of /proc, and says how many there were (zombies included, which
// still hold their numbers). It signals nothing when /proc is not of its
// PID namespace.
func signalBelow(root int, sig syscall.Signal) int {
	if !procIsOurs() {
		return 0
	}
	t, err := proc.All()
	if err != nil {
		return 0
	}
	below := proc.Descendants(t, root)
	if len(below) == 0 {
		return 0
	}
	below = below[1:]
	for _, p := range below {
		if st := t[p]; st.State != 'Z' && st.State != 'X' {
			_ = signalSame(p, st.StartTime, sig)
		}
	}
	return len(below)
}

// JobProcs is what the supervisor knows of the job's processes, for
// Engine.Terminate.
type JobProcs struct {
	Init int // job-init, when one runs
	// Seen are processes seen in the job, with their start times, and
	// Sessions the sessions they were in.
	Seen     map[int]uint64
	Sessions map[int]bool
	// PIDs the job's processes had at the checkpoint being restored: a
	// failed restore's leftovers among the supervisor's children.
	PIDs []int
}

// adopted reports whether st, a child of the supervisor other than
// job-init, is a process of the job: the supervisor is the subreaper of
// job-init's descendants, so the job's processes become its children when
// job-init is gone. It takes one for the job's when it was seen in the
// job, is in one of the sessions the job's processes were seen in (or
// job-init's), or has a PID of the checkpoint being restored.
func (j JobProcs) adopted(st proc.Stat, sessions map[int]bool, pids map[int]bool) bool {
	if start, ok := j.Seen[st.PID]; ok && start == st.StartTime {
		return true
	}
	return sessions[st.SID] || pids[st.PID]
}

// endJob kills every process of the job and reaps those that are the
// supervisor's children, until none is left or limit passes. The job is
// job-init's tree, and the trees of the supervisor's children that are
// the job's (adopted). Only those are signalled, each pinned (signalSame).
func endJob(j JobProcs, limit time.Duration) error {
	self := os.Getpid()
	sessions := map[int]bool{}
	if j.Init > 0 {
		sessions[j.Init] = true
	}
	for sid := range j.Sessions {
		sessions[sid] = true
	}
	delete(sessions, 0)
	if st, err := proc.ReadStat(self); err == nil {
		delete(sessions, st.SID) // the supervisor's own session is not the job's
	}
	pids := map[int]bool{}
	for _, p := range j.PIDs {
		pids[p] = true
	}
	if !procIsOurs() {
		return errors.New("/proc does not show this process's PID namespace: not ending anything by it")
	}
	deadline := time.Now().Add(limit)
	for {
		t, err := proc.All()
		if err != nil {
			return err
		}
		var roots []int
		for p, st := range t {
			if st.PPID != self {
				continue
			}
			if p == j.Init || j.adopted(st, sessions, pids) {
				roots = append(roots, p)
			}
		}
		sort.Ints(roots)
		job := proc.Descendants(t, roots...)
		if len(job) == 0 {
			return nil
		}
		for _, p := range job {
			st := t[p]
			if st.State != 'Z' && st.State != 'X' {
				_ = signalSame(p, st.StartTime, syscall.SIGKILL)
			}
		}
		for _, p := range roots {
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(p, &ws, syscall.WNOHANG, nil)
		}
		if time.Now().After(deadline) {
			var left []string
			for _, p := range job {
				left = append(left, fmt.Sprintf("%d (%s, state %c)", p, t[p].Comm, t[p].State))
			}
			return fmt.Errorf("processes of the job still there after %s: %s", limit, strings.Join(left, ", "))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
