package monitor

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/migrate"
	"golang.org/x/sys/unix"
)

// ErrGaveUp means the job kept failing and --max-restarts was reached, or
// no checkpoint of it can be restored.
var ErrGaveUp = errors.New("gave up restoring the job")

// Supervisor runs and protects one job. Create it with New, drive it with
// Run; Status and Request are safe to call from any goroutine while Run is
// going. It is a loop: what to do is decided by the policy (policy.go),
// the work is done by its Engine (engine.go).
type Supervisor struct {
	cfg     Config
	log     *slog.Logger
	eng     Engine
	reqs    chan request
	watch   *adoptWatch      // a job migrated here, until its source let go
	standby *migrate.Standby // a node kept up to date with the job's generations

	mu     sync.Mutex
	status Status

	// Owned by Run's goroutine.
	began     time.Time // when this supervisor began
	pol       policy
	initPID   int            // job-init while it runs
	lastInit  int            // the latest job-init, also once it has ended
	roots     map[int]string // tree root pid (as job-init names it) -> tree name
	nodePID   map[int]int    // with namespaces: the job's PIDs -> the node's (treePIDs)
	eventsOff int64
	cost      costEstimate
	interval  time.Duration
	chans     *channelWatch
	hang      map[string]hangMark
	beat      beatWatch
	stills    []stillness // when the job stood still by our doing (checkpoints), lately
	mem       memWatch
	hostEnd   *treeEnd          // the host tree's end, from job-init's events
	pending   failure           // a failure seen in job-init's events or a refused checkpoint, reported by detect
	genBegan  map[int]time.Time // generation -> when its checkpoint began, by our clock
	seen      map[int]uint64    // processes seen in the job -> start time
	sessions  map[int]bool      // sessions the job's processes were seen in
	reported  map[int]bool      // generations whose being passed over was reported
}

type request struct {
	op    string // checkpoint, stop, swap-out, swap-in, migrate
	mig   *MigrateRequest
	reply chan reply
}

type reply struct {
	res *checkpoint.Result
	mig *migrate.Result
	err error
}

// New checks cfg and returns a supervisor.
func New(cfg Config) (*Supervisor, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	s := &Supervisor{cfg: cfg, log: cfg.Logger.With("job", cfg.Name), reqs: make(chan request)}
	s.eng = cfg.Engine
	if s.eng == nil {
		s.eng = &criuEngine{cfg: &s.cfg, log: s.log}
	}
	s.pol = newPolicy(cfg)
	s.status = Status{Name: cfg.Name, Store: cfg.Store, State: StateStarting}
	s.interval = cfg.Interval
	s.began = time.Now()
	s.genBegan, s.seen, s.sessions, s.reported = map[int]time.Time{}, map[int]uint64{}, map[int]bool{}, map[int]bool{}
	s.roots, s.hang = map[int]string{}, map[string]hangMark{}
	return s, nil
}

// Run starts the job (or resumes it from the store's newest checkpoint of
// an unfinished run), supervises it until it completes, is stopped, or
// fails beyond MaxRestarts, and returns the job's exit code. Cancelling ctx
// stops supervision and kills the job (use Request "stop" to checkpoint
// first).
//
// Run makes the calling process a child subreaper: processes of the job
// whose parents are gone become its children, so that it can end and reap
// them (see endJob for which children it takes for the job's).
func (s *Supervisor) Run(ctx context.Context) (code int, err error) {
	defer func() {
		if err != nil {
			s.mu.Lock()
			if s.status.State != StateFailed && s.status.State != StateStopped {
				c := max(code, 1)
				s.status.State, s.status.ExitCode = StateFailed, &c
			}
			if s.status.LastFailure == "" {
				s.status.LastFailure = err.Error()
			}
			s.mu.Unlock()
		}
	}()
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	st, err := store.Create(s.cfg.Store, "cryo "+checkpoint.Version)
	if err != nil {
		return 1, err
	}
	s.cfg.Store = st.Dir
	if err := os.MkdirAll(RunDir(st.Dir), 0o700); err != nil {
		return 1, err
	}
	prev := s.readRunState()
	gens, _ := s.eng.Generations()
	// Resume an unfinished run: one that was stopped, swapped out, killed
	// with its supervisor, or that gave up (the node may be well now).
	resume := !s.cfg.Fresh && len(gens) > 0 && prev != nil && prev.State != StateCompleted && prev.State != StateMigrated
	if s.cfg.TakeOver && len(gens) > 0 {
		resume, prev = true, nil
	}
	if resume && prev != nil && !slices.EqualFunc(prev.Trees, s.cfg.Trees, func(a, b TreeSpec) bool { return slices.Equal(a.Argv, b.Argv) }) {
		return 1, fmt.Errorf("store %s holds a checkpoint of a different job (%q); use --fresh to start over, or another store", st.Dir, prev.Trees[0].Argv)
	}
	if sb := s.cfg.Standby; sb != nil {
		stop, err := s.startStandby(ctx, sb)
		if err != nil {
			return 1, err
		}
		defer func() { stop(code, err) }()
	}
	if resume && prev != nil {
		for g, why := range prev.PassedOver {
			s.pol.passOver(g, why, true)
		}
	}
	if a := s.cfg.Adopt; a != nil {
		return s.adopt(ctx, a)
	}
	s.writeRunState(StateStarting, nil)
	if resume {
		if err := s.recover(ctx, nil); err != nil {
			s.setExit(StateFailed, 1)
			s.event("gave-up", err.Error(), 0)
			return 1, err
		}
	} else if err := s.start(ctx); err != nil {
		s.writeRunState(StateFailed, nil)
		return 1, err
	}
	return s.loop(ctx)
}

func (s *Supervisor) eventsFile() string { return filepath.Join(s.cfg.jobDir(), "events.jsonl") }

// start launches the job afresh.
func (s *Supervisor) start(ctx context.Context) error {
	if off, err := fileSize(s.eventsFile()); err == nil {
		s.eventsOff = off
	}
	pid, err := s.eng.Start(ctx, s.eventsFile())
	if err != nil {
		return err
	}
	s.initPID = pid
	s.afterStart()
	s.event("started", fmt.Sprintf("job-init pid %d", pid), 0)
	return nil
}

// afterStart resets the detectors for a fresh or restored job.
func (s *Supervisor) afterStart() {
	s.roots = map[int]string{}
	s.lastInit = s.initPID
	s.chans = newChannelWatch(s.cfg.ChannelGrace)
	s.hang = map[string]hangMark{}
	s.beat.reset(filepath.Join(s.cfg.jobDir(), "heartbeat"), time.Now())
	s.stills = nil
	s.mem = memWatch{}
	s.hostEnd = nil
	s.pending = failure{}
	s.seen, s.sessions = map[int]uint64{}, map[int]bool{}
	s.mu.Lock()
	s.status.PID = s.initPID
	s.status.State = StateRunning
	s.status.Trees = map[string]int{}
	s.mu.Unlock()
	s.writeRunState(StateRunning, nil)
}

// loop is the supervision loop.
func (s *Supervisor) loop(ctx context.Context) (int, error) {
	var ckptTimer <-chan time.Time
	resetTimer := func() {
		if s.interval > 0 {
			ckptTimer = time.After(s.interval)
		} else {
			ckptTimer = nil
		}
		s.cfg.Metrics.Interval(s.cfg.Name, s.interval)
		s.mu.Lock()
		s.status.Interval = s.interval
		s.mu.Unlock()
	}
	resetTimer()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	lastSlow := time.Now()
	for {
		select {
		case <-ctx.Done():
			s.terminate()
			s.writeRunState(StateStopped, nil)
			return 1, ctx.Err()
		case <-ckptTimer:
			if s.periodic(ctx) {
				resetTimer()
			} else {
				ckptTimer = time.After(time.Second) // try again soon
			}
		case r := <-s.reqs:
			code, done, err := s.handle(ctx, r)
			if done {
				return code, err
			}
			resetTimer()
		case <-tick.C:
			if err := s.settleAdopted(); err != nil {
				return 1, err
			}
			s.readEvents()
			if s.initPID == 0 {
				continue // swapped out
			}
			var f failure
			if ended, how := s.reapInit(); ended {
				s.readEvents() // everything job-init wrote before it ended
				var code int
				var done bool
				f, code, done = judgeEnd(how, s.hostEnd, s.pending, s.cfg.RestartOnExit, time.Now())
				if done {
					return s.finish(code)
				}
			} else if s.hostEnd == nil && time.Since(lastSlow) >= time.Second {
				// (Once the host has ended, job-init is ending the rest:
				// what breaks meanwhile is no failure.)
				lastSlow = time.Now()
				f = s.detect()
			}
			if f.kind == "" {
				continue
			}
			if s.watch != nil && !s.watch.done {
				// A job migrated here that fails before its source let go
				// goes back there, not to an older generation.
				s.event("failure", f.String(), 0)
				s.watch.failed = errors.New(f.String())
				if err := s.settleAdopted(); err != nil {
					return 1, err
				}
			}
			code, done, err := s.fail(ctx, f)
			if done {
				return code, err
			}
			resetTimer()
		}
	}
}

// finish ends supervision of a job that gave its own answer.
func (s *Supervisor) finish(code int) (int, error) {
	if s.watch != nil && !s.watch.done {
		// A job migrated here ended with its own answer before its grace
		// period was over: it ran here, so the source's copy must go.
		s.watch.done = true
		if err := s.watch.a.In.Running(); err != nil {
			s.event("warning", "the job's source did not confirm that its copy ended: "+err.Error(), 0)
		}
	}
	s.setExit(StateCompleted, code)
	if code == 0 {
		s.event("completed", "the job finished with exit code 0", 0)
	} else {
		s.event("exited", fmt.Sprintf("the host tree exited with code %d: the job's answer, passed through (--restart-on-exit restarts such a job)", code), 0)
	}
	return code, nil
}

// reapInit checks (without blocking) whether job-init has ended, and how.
func (s *Supervisor) reapInit() (bool, string) {
	var ws syscall.WaitStatus
	pid, err := syscall.Wait4(s.initPID, &ws, syscall.WNOHANG, nil)
	if errors.Is(err, syscall.ECHILD) {
		// Not our child (should not happen): fall back to existence.
		if proc.Exists(s.initPID) {
			return false, ""
		}
		how := fmt.Sprintf("job-init (pid %d) disappeared", s.initPID)
		s.initPID = 0
		return true, how
	}
	if pid != s.initPID {
		return false, ""
	}
	code, sig := exitCode(ws)
	how := fmt.Sprintf("job-init (pid %d) exited with code %d", s.initPID, code)
	if sig != "" {
		how = fmt.Sprintf("job-init (pid %d) was killed by %s", s.initPID, sig)
	}
	s.initPID = 0
	return true, how
}

// readEvents consumes new lines of job-init's events file.
func (s *Supervisor) readEvents() {
	f, err := os.Open(s.eventsFile())
	if err != nil {
		return
	}
	defer f.Close()
	if _, err := f.Seek(s.eventsOff, io.SeekStart); err != nil {
		return
	}
	r := bufio.NewReader(f)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return // partial line: read it next time
		}
		s.eventsOff += int64(len(line))
		var e InitEvent
		if json.Unmarshal(line, &e) != nil {
			continue
		}
		switch e.Event {
		case "started":
			s.roots[e.PID] = e.Tree
			s.mu.Lock()
			s.status.Trees[e.Tree] = e.PID
			s.mu.Unlock()
			if s.cfg.Namespaces {
				// e.PID is the tree's PID in the job's namespace: find it on
				// the node now (treePIDs records its session).
				s.treePIDs()
			} else {
				s.sessions[e.PID] = true // each tree starts a session of its own
			}
		case "exited", "start-failed":
			delete(s.roots, e.PID)
			end := treeEnd{tree: e.Tree, pid: e.PID, code: e.Code, signal: e.Signal, at: e.Time}
			if s.isHost(e.Tree) {
				s.hostEnd = &end
				continue
			}
			// An offload tree that failed while the host still needed it
			// (not one job-init ended because the host had ended).
			if !e.AfterHost && s.pending.kind == "" && (e.Code != 0 || e.Event == "start-failed") {
				detail := fmt.Sprintf("offload tree %s (pid %d) %s", e.Tree, e.PID, end.describe())
				if e.Event == "start-failed" {
					detail = fmt.Sprintf("offload tree %s failed to start: %s", e.Tree, e.Error)
				}
				s.pending = failure{kind: kindTree, tree: e.Tree, code: e.Code, onset: e.Time, detail: detail}
			}
		}
	}
}

func (s *Supervisor) isHost(name string) bool {
	for _, t := range s.cfg.Trees {
		if t.Name == name {
			return t.Host
		}
	}
	return false
}

// jobProcs is what the supervisor knows of the job's processes: job-init,
// the processes seen in it, and their sessions, which include job-init's
// and each tree's (every tree starts in a session of its own).
func (s *Supervisor) jobProcs() JobProcs {
	sessions := map[int]bool{}
	for sid := range s.sessions {
		sessions[sid] = true
	}
	for pid := range s.roots {
		if p := s.onNode(pid); p != 0 {
			sessions[p] = true
		}
	}
	if s.lastInit != 0 {
		sessions[s.lastInit] = true
	}
	return JobProcs{Init: s.initPID, Seen: s.seen, Sessions: sessions}
}

// terminate ends every process of the job and reaps them.
func (s *Supervisor) terminate() {
	if err := s.eng.Terminate(s.jobProcs()); err != nil {
		s.event("warning", "ending the job: "+err.Error(), 0)
	}
	s.initPID = 0
}

func (s *Supervisor) handle(ctx context.Context, r request) (int, bool, error) {
	var rep reply
	if r.op != "swap-in" && s.initPID != 0 {
		if why := s.unwell(); why != "" {
			if r.op == "stop" {
				// Stop all the same, keeping the older checkpoints.
				s.terminate()
				r.reply <- reply{err: fmt.Errorf("the job was failing (%s): stopped without a new checkpoint", why)}
				s.setExit(StateStopped, 128+int(syscall.SIGTERM))
				s.event("stopped", "without a new checkpoint: the job was failing: "+why, 0)
				return 128 + int(syscall.SIGTERM), true, nil
			}
			r.reply <- reply{err: fmt.Errorf("not checkpointing a job that is failing: %s", why)}
			return 0, false, nil
		}
	}
	switch r.op {
	case "checkpoint":
		rep.res, rep.err = s.checkpoint(ctx, false)
	case "stop":
		rep.res, rep.err = s.checkpoint(ctx, true)
		if rep.err == nil {
			r.reply <- rep
			s.setExit(StateStopped, 128+int(syscall.SIGTERM))
			s.event("stopped", fmt.Sprintf("checkpointed as generation %d and stopped", rep.res.Generation), rep.res.Generation)
			return 128 + int(syscall.SIGTERM), true, nil
		}
	case "swap-out":
		rep.res, rep.err = s.checkpoint(ctx, true)
		if rep.err == nil {
			s.setState(StateSwapped)
			s.writeRunState(StateSwapped, nil)
			s.event("swapped-out", fmt.Sprintf("generation %d", rep.res.Generation), rep.res.Generation)
		}
	case "migrate":
		var done bool
		rep.mig, done, rep.err = s.migrate(ctx, *r.mig)
		if done {
			r.reply <- rep
			return 0, true, nil
		}
	case "swap-in":
		if s.initPID != 0 {
			rep.err = errors.New("the job is not swapped out")
			break
		}
		rep.err = s.recover(ctx, nil)
		if rep.err == nil {
			s.event("swapped-in", fmt.Sprintf("job-init pid %d", s.initPID), 0)
		}
	}
	r.reply <- rep
	return 0, false, nil
}

func fileSize(p string) (int64, error) {
	st, err := os.Stat(p)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}
