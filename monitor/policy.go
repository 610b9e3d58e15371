package monitor

// The supervisor's decisions, as pure functions of what happened: what the
// end of job-init means, whether a failure is one to restore from, which
// generation to restore, when to give up and which generations to keep.
// The supervisor (supervisor.go, recover.go) carries them out; the
// decisions are unit-tested here without CRIU (policy_test.go).

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/restore"
	"golang.org/x/sys/unix"
)

// Failure kinds.
const (
	kindExit    = "exit"      // the host tree exited with a non-zero code (a failure only with RestartOnExit)
	kindCrash   = "crash"     // the host tree, or job-init, was killed by a signal or vanished
	kindTree    = "tree-exit" // an offload tree ended while the host still needed it
	kindChannel = "channel"   // a channel between two trees broke
	kindHang    = "hang"      // an offload tree made no CPU progress
	kindBeat    = "heartbeat" // the job stopped touching its heartbeat file
	kindGPU     = "gpu-xid"   // a critical GPU error hit the job
)

// failure is a detected failure and its onset: the latest time it can have
// begun (the last time the job was seen well, by the supervisor's clock),
// so that a checkpoint taken after that is never restored: it may hold
// the fault itself.
type failure struct {
	kind   string
	tree   string // the tree it concerns, if one
	code   int    // exit code, or 128+signal, for exits and crashes
	detail string
	onset  time.Time
	// reported: the host exited with a code of its own that reports a
	// failure of a process below it (an MPI launcher's rank): that
	// process may have died well before the host ended (see choose).
	reported bool
}

func (f failure) String() string { return f.kind + ": " + f.detail }

// same reports whether g is the same failure as f, happening again: of the
// same kind, in the same tree, with the same code.
func (f failure) same(g failure) bool {
	return f.kind == g.kind && f.tree == g.tree && f.code == g.code
}

// treeEnd is how a tree of the job ended, from job-init's events.
type treeEnd struct {
	tree   string
	pid    int
	code   int    // exit code, or 128+signal
	signal string // set when a signal killed it
	at     time.Time
}

func (e treeEnd) describe() string {
	if e.signal != "" {
		return fmt.Sprintf("was killed by %s", e.signal)
	}
	return fmt.Sprintf("exited with code %d", e.code)
}

// judgeEnd decides what the end of job-init means: the job's own answer
// (done, with the code to pass through), or a failure to restore from.
//   - The host tree exited with 0: the job completed, whatever else failed.
//   - An offload tree failed while the host still needed it (pending): the
//     host's own end follows from that, so that is the failure.
//   - The host was killed by a signal, or job-init ended without reporting
//     the host's end (it was killed): a crash.
//   - The host exited with 128+N, N a signal's number: how shells and MPI
//     launchers (mpirun, mpiexec, srun) report that a process of theirs,
//     a rank, was killed by signal N. The job did not give an answer: a
//     crash too.
//   - The host exited with another code: the job's answer, passed through,
//     unless restartOnExit makes it a failure.
func judgeEnd(initHow string, host *treeEnd, pending failure, restartOnExit bool, now time.Time) (f failure, code int, done bool) {
	switch {
	case host != nil && host.code == 0:
		return failure{}, 0, true
	case pending.kind != "":
		return pending, 0, false
	case host == nil:
		return failure{kind: kindCrash, detail: initHow + " before the host tree ended", onset: now, code: -1}, 0, false
	case host.signal != "":
		return failure{kind: kindCrash, tree: host.tree, code: host.code, onset: host.at,
			detail: fmt.Sprintf("host tree (pid %d) %s", host.pid, host.describe())}, 0, false
	case reportedSignal(host.code) != "":
		return failure{kind: kindCrash, tree: host.tree, code: host.code, onset: host.at, reported: true,
			detail: fmt.Sprintf("host tree (pid %d) %s: a process of the job was killed by %s (128+%d is how shells and MPI launchers report that)",
				host.pid, host.describe(), reportedSignal(host.code), host.code-128)}, 0, false
	case restartOnExit:
		return failure{kind: kindExit, tree: host.tree, code: host.code, onset: host.at, reported: true,
			detail: fmt.Sprintf("host tree (pid %d) %s", host.pid, host.describe())}, 0, false
	}
	return failure{}, host.code, true
}

// reportedSignal is the name of the signal an exit code of 128+N reports
// (N from 1 to 64, the kernel's signals), or "" for any other code.
func reportedSignal(code int) string {
	if code <= 128 || code > 128+64 {
		return ""
	}
	if name := unix.SignalName(syscall.Signal(code - 128)); name != "" {
		return name
	}
	return fmt.Sprintf("signal %d", code-128)
}

// Generation is a committed generation, as the supervisor sees it.
type Generation struct {
	N int
	// Began is when its checkpoint began: the supervisor's own record for
	// the checkpoints it took, else derived from the manifest.
	Began time.Time
	PIDs  []int // of its processes
}

// pass is why a generation is never restored.
type pass struct {
	why string
	// fault: it may hold the fault itself (it was taken after the failure
	// began, or the job failed again the same way right after it was
	// restored from it). Such passes outlive the supervisor (run state);
	// the others (damage, a restore that fails) are for this run only.
	fault bool
}

// lastRestore is the latest time the job was brought back.
type lastRestore struct {
	valid        bool
	gen          int // 0: started from the beginning
	at           time.Time
	cause        failure // the failure it recovered from
	checkpointed bool    // a checkpoint was taken since
}

// policy holds what the decisions depend on. Its methods are pure: they
// read and update this state, and nothing else.
type policy struct {
	maxRestarts  int
	backoff      time.Duration
	repeatWindow time.Duration

	restarts int
	onset    time.Time // of the failure being recovered from; zero for none
	cause    failure
	passed   map[int]pass
	tries    map[int]int // transient restore failures per generation, this recovery
	last     lastRestore
	// addrSince is when, in this recovery, restores first found an address
	// the job binds in use (zero: not yet).
	addrSince time.Time
}

// AddrWait is how long restores keep trying while an address the job
// binds is in use on the node (criu.ErrAddressInUse), and addrRetry how
// often: Linux keeps a closed connection's port in TIME_WAIT for 60 s.
const (
	AddrWait  = 75 * time.Second
	addrRetry = 3 * time.Second
)

func newPolicy(cfg Config) policy {
	return policy{maxRestarts: cfg.MaxRestarts, backoff: cfg.Backoff, repeatWindow: cfg.RepeatWindow,
		passed: map[int]pass{}, tries: map[int]int{}}
}

// passOver marks generation g never to be restored.
func (p *policy) passOver(g int, why string, fault bool) {
	if old, ok := p.passed[g]; ok && old.fault {
		return
	}
	p.passed[g] = pass{why: why, fault: fault}
}

// faulty lists the generations passed over because they may hold a fault.
func (p *policy) faulty() map[int]string {
	var out map[int]string
	for g, ps := range p.passed {
		if ps.fault {
			if out == nil {
				out = map[int]string{}
			}
			out[g] = ps.why
		}
	}
	return out
}

// failed records a failure to restore from. When the job failed the same
// way right after it was restored (within the repeat window, before any
// new checkpoint), the generation it was restored from is passed over: it
// holds the fault, or brings it back.
func (p *policy) failed(f failure) {
	l := p.last
	if l.valid && l.gen > 0 && !l.checkpointed && f.same(l.cause) && f.onset.Sub(l.at) < p.repeatWindow {
		p.passOver(l.gen, fmt.Sprintf("the job failed the same way (%s) right after it was restored from it", f.kind), true)
	}
	p.onset, p.cause, p.tries, p.addrSince = f.onset, f, map[int]int{}, time.Time{}
}

// attempt says whether another attempt to bring the job back may be made,
// counts it, and how long to wait first: the backoff, doubled per
// consecutive attempt, up to 30 s.
func (p *policy) attempt() (time.Duration, bool) {
	if p.restarts >= p.maxRestarts {
		return 0, false
	}
	p.restarts++
	return p.wait(p.restarts), true
}

func (p *policy) wait(n int) time.Duration {
	d := p.backoff
	for i := 1; i < n && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}

// choice is what to bring the job back from.
type choice struct {
	gen    int    // the generation to restore
	fresh  bool   // or start the job from the beginning, because of why
	why    string // why fresh, or why nothing may be tried (giveUp)
	giveUp bool
	// after are the generations passed over because they were taken
	// after the failure may have begun; they stay in the store.
	after []int
}

// choose picks the newest generation that was taken before the failure's
// onset and is not passed over. Generations taken after the onset are
// passed over from then on (they may hold the fault), not deleted. When
// the host reported the failure of a process below it (an MPI launcher's
// exit code for a dead rank), that process may have died well before the
// host ended, and a generation taken meanwhile lacks it: one with fewer
// processes than the generation before it is passed over too. With none left the job starts from the beginning,
// unless some generation failed to restore for a reason that recurs (then
// the user has to act: a fresh start would throw the work away).
func (p *policy) choose(gens []Generation) choice {
	gens = append([]Generation(nil), gens...)
	sort.Slice(gens, func(i, j int) bool { return gens[i].N < gens[j].N })
	var c choice
	unrestorable := 0
	for i := len(gens) - 1; i >= 0; i-- {
		g := gens[i]
		if ps, ok := p.passed[g.N]; ok {
			if !ps.fault {
				unrestorable++
			}
			continue
		}
		if !p.onset.IsZero() && !g.Began.Before(p.onset) {
			c.after = append(c.after, g.N)
			p.passOver(g.N, fmt.Sprintf("it was taken after a failure may have begun (%s)", p.onset.Format("15:04:05.000")), true)
			continue
		}
		if p.cause.reported && i > 0 && len(g.PIDs) < len(gens[i-1].PIDs) {
			p.passOver(g.N, fmt.Sprintf("it holds %d processes, fewer than the %d of the generation before: the process whose failure the host reported may have been gone already",
				len(g.PIDs), len(gens[i-1].PIDs)), true)
			continue
		}
		c.gen = g.N
		return c
	}
	switch {
	case unrestorable > 0:
		c.giveUp, c.why = true, fmt.Sprintf("no generation restores (tried %s)", p.unrestorable())
	case len(gens) == 0:
		c.fresh, c.why = true, "no checkpoint yet"
	case len(c.after) > 0 && len(c.after) == len(gens):
		c.fresh, c.why = true, "no checkpoint from before the failure"
	default:
		c.fresh, c.why = true, "every checkpoint may hold the fault"
	}
	return c
}

func (p *policy) unrestorable() string {
	var gs []int
	for g, ps := range p.passed {
		if !ps.fault {
			gs = append(gs, g)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(gs)))
	var parts []string
	for _, g := range gs {
		parts = append(parts, fmt.Sprint(g))
	}
	return strings.Join(parts, ", ")
}

// verdict is what to do after a restore failed.
type verdict int

const (
	retryLater verdict = iota // back off, then try again from the newest candidate
	tryOlder                  // the generation is passed over: try the next one now
	stop                      // no generation can be restored here now: give up
	waitRetry                 // wait (addrRetry) and try the same again: not a restart
)

// restoreFailed decides what a failed restore of generation g means, from
// the error's kind alone:
//   - a PID the job needs is held by a live process outside it: no
//     generation restores on this node while it lives, and cryo never
//     signals it (stop);
//   - an address the job binds is in use on the node: most likely its own
//     old connections in TCP's TIME_WAIT, gone within a minute; wait and
//     try again (waitRetry, not counted as a restart) for up to AddrWait,
//     then it is another's, and no generation restores here now (stop);
//   - the generation is damaged, or CRIU's failure recurs (a missing file,
//     a limit): that generation will never restore (tryOlder);
//   - anything else may pass (a dying process still holding a PID): retry
//     after the backoff, and pass the generation over when it fails twice.
func (p *policy) restoreFailed(g int, err error, now time.Time) verdict {
	var pe *restore.PIDError
	switch {
	case errors.As(err, &pe) && pe.Live:
		return stop
	case errors.Is(err, criu.ErrAddressInUse):
		if p.addrSince.IsZero() {
			p.addrSince = now
		}
		if now.Sub(p.addrSince) < AddrWait {
			return waitRetry
		}
		return stop
	case errors.Is(err, store.ErrCorrupt):
		p.passOver(g, "it is damaged", false)
		return tryOlder
	case errors.Is(err, criu.ErrRecurring):
		p.passOver(g, "its restore fails in a way that recurs", false)
		return tryOlder
	}
	p.tries[g]++
	if p.tries[g] >= 2 {
		p.passOver(g, "it failed to restore twice", false)
		return tryOlder
	}
	return retryLater
}

// restored records that the job was brought back from gen (0: started from
// the beginning) at now.
func (p *policy) restored(gen int, now time.Time) {
	p.last = lastRestore{valid: true, gen: gen, at: now, cause: p.cause}
	p.onset, p.tries, p.addrSince = time.Time{}, map[int]int{}, time.Time{}
}

// checkpointed records that the job was checkpointed.
func (p *policy) checkpointed() { p.last.checkpointed = true }

// retain decides which generations retention removes: it keeps the newest
// keep generations that may be restored, and besides them the newest one
// whose checkpoint began before lastWell, the last time the job was seen
// well (its last heartbeat, its last CPU progress): a failure found only
// at its timeout then still has a checkpoint from before it. Generations
// passed over are not counted; those newer than the oldest kept one stay
// (skipped, not deleted), older ones go. keep <= 0 keeps everything.
func retain(gens []Generation, keep int, passed map[int]pass, lastWell time.Time) []int {
	if keep <= 0 {
		return nil
	}
	gens = append([]Generation(nil), gens...)
	sort.Slice(gens, func(i, j int) bool { return gens[i].N > gens[j].N })
	kept := map[int]bool{}
	oldest := 0
	n := 0
	for _, g := range gens {
		if _, ok := passed[g.N]; ok {
			continue
		}
		if n < keep {
			kept[g.N], oldest = true, g.N
			n++
		}
	}
	if !lastWell.IsZero() {
		for _, g := range gens {
			if _, ok := passed[g.N]; !ok && g.Began.Before(lastWell) {
				if !kept[g.N] {
					kept[g.N], oldest = true, g.N
				}
				break
			}
		}
	}
	var remove []int
	for _, g := range gens {
		if kept[g.N] {
			continue
		}
		if _, ok := passed[g.N]; ok && g.N > oldest {
			continue
		}
		remove = append(remove, g.N)
	}
	sort.Ints(remove)
	return remove
}
