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
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/restore"
	"golang.org/x/sys/unix"
)

// ErrGaveUp means the job kept failing and --max-restarts was reached.
var ErrGaveUp = errors.New("gave up restoring the job")

// Config describes one supervised job.
type Config struct {
	Name  string     // job name in metrics and the control socket
	Store string     // the job's store; its run/ directory holds logs and state
	Trees []TreeSpec // host first; at least one tree must be the host
	// Interval between periodic checkpoints; 0 disables them (signals and
	// the control socket can still ask for one).
	Interval time.Duration
	// AutoInterval recomputes the interval from the measured checkpoint
	// cost and MTBF with Daly's formula.
	AutoInterval bool
	MTBF         time.Duration
	// MaxRestarts bounds how many times a failed job is restored.
	MaxRestarts int
	// HeartbeatTimeout, when set, declares the job failed if the file named
	// by $CRYO_HEARTBEAT_FILE (which the job touches) grows stale.
	HeartbeatTimeout time.Duration
	// HangTimeout, when set, declares an offload tree hung if it uses no
	// CPU for this long.
	HangTimeout time.Duration
	// ChannelGrace is how long a broken channel between two trees of the
	// job may last before it counts as a failure (default 3 s); negative
	// turns the channel watcher off.
	ChannelGrace time.Duration
	// Grace between SIGTERM and SIGKILL of offload trees when the host ends.
	Grace time.Duration
	Keep  int // generations to keep (0: all)
	// Fresh starts the job from scratch even if the store holds a
	// checkpoint of an unfinished run.
	Fresh bool
	// Backoff before the first restore; doubled per consecutive failure, up
	// to 30 s (default 1 s).
	Backoff    time.Duration
	CRIU       criu.Binary
	CheckCache string
	WorkDir    string
	// Replica is a second store that every checkpoint is copied to and
	// restores heal damaged chunks from (checkpoint.Options.Replica).
	Replica string
	// Self is the cryo binary that runs job-init ("cryo job-init");
	// default /proc/self/exe.
	Self    string
	Logger  *slog.Logger
	Metrics *Metrics
	// Health reports critical GPU errors affecting the job's processes
	// (NVML Xid events); nil when the node has no GPUs.
	Health HealthSource
	// OnEvent, if set, is called for every Event (from the supervisor's
	// goroutine; keep it quick).
	OnEvent func(Event)
}

// HealthSource reports device failures for a set of PIDs.
type HealthSource interface {
	// Critical returns descriptions of critical errors (e.g. "Xid 79 on
	// GPU-…") that hit the job since the last call.
	Critical(pids []int) []string
}

// Event is something that happened to a supervised job.
type Event struct {
	Time   time.Time `json:"time"`
	Job    string    `json:"job"`
	Kind   string    `json:"kind"` // started, resumed, checkpoint, checkpoint-failed, failure, restored, restore-failed, completed, stopped, swapped-out, swapped-in, warning, gave-up
	Detail string    `json:"detail"`
	Gen    int       `json:"generation,omitempty"`
}

// State of a supervised job.
type State string

// States.
const (
	StateStarting  State = "starting"
	StateRunning   State = "running"
	StateRestoring State = "restoring"
	StateSwapped   State = "swapped-out"
	StateCompleted State = "completed"
	StateFailed    State = "failed"
	StateStopped   State = "stopped"
)

// Status is a snapshot of a supervised job.
type Status struct {
	Name           string         `json:"name"`
	Store          string         `json:"store"`
	State          State          `json:"state"`
	PID            int            `json:"pid,omitempty"` // job-init
	Trees          map[string]int `json:"trees,omitempty"`
	Generation     int            `json:"generation,omitempty"` // newest committed
	Checkpoints    int            `json:"checkpoints"`
	Restarts       int            `json:"restarts"`
	Interval       time.Duration  `json:"interval_ns"`
	LastCheckpoint time.Time      `json:"last_checkpoint,omitzero"`
	LastFailure    string         `json:"last_failure,omitempty"`
	ExitCode       *int           `json:"exit_code,omitempty"`
}

// runState is written to <store>/run/state.json so that a later `cryo run`
// knows whether to resume.
type runState struct {
	State    State      `json:"state"`
	Trees    []TreeSpec `json:"trees"`
	ExitCode *int       `json:"exit_code,omitempty"`
	Updated  time.Time  `json:"updated"`
}

// Supervisor runs and protects one job. Create it with New, drive it with
// Run; the other methods are safe to call from any goroutine while Run is
// going.
type Supervisor struct {
	cfg  Config
	log  *slog.Logger
	reqs chan request

	mu     sync.Mutex
	status Status

	// Owned by Run's goroutine.
	initPID    int
	roots      map[int]string // tree root pid -> tree name
	eventsOff  int64
	cost       costEstimate
	interval   time.Duration
	chans      *channelWatch
	hang       map[string]hangMark
	beat       time.Time   // last heartbeat seen
	stills     []stillness // when the job stood still by our doing (checkpoints), lately
	mem        memWatch
	hostExit   *int
	hostExitAt time.Time
	genBegan   map[int]time.Time // generation -> when its checkpoint began
	pending    failure           // a failure seen in job-init's events, reported by detect
	// before, when set, bounds which generations a restore may use: those
	// whose checkpoint began before the failure may have begun.
	before time.Time
}

// failure is a detected failure and the latest time it can have begun
// (the last time the job was seen well), so that a checkpoint taken after
// that is never restored: it may hold the fault itself.
type failure struct {
	kind, detail string
	onset        time.Time
}

type request struct {
	op    string // checkpoint, stop, swap-out, swap-in
	reply chan reply
}

type reply struct {
	res *checkpoint.Result
	err error
}

// New checks cfg and returns a supervisor.
func New(cfg Config) (*Supervisor, error) {
	if cfg.Store == "" {
		return nil, errors.New("no store given")
	}
	hosts := 0
	for i, t := range cfg.Trees {
		if len(t.Argv) == 0 {
			return nil, fmt.Errorf("tree %d (%s) has no command", i, t.Name)
		}
		if t.Host {
			hosts++
		}
	}
	if hosts != 1 {
		return nil, fmt.Errorf("a job needs exactly one host tree, got %d", hosts)
	}
	if cfg.Name == "" {
		cfg.Name = "job"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.ChannelGrace == 0 {
		cfg.ChannelGrace = 3 * time.Second
	}
	if cfg.Backoff == 0 {
		cfg.Backoff = time.Second
	}
	if cfg.Self == "" {
		cfg.Self = "/proc/self/exe"
	}
	if cfg.AutoInterval && cfg.MTBF <= 0 {
		return nil, errors.New("--interval auto needs --mtbf")
	}
	s := &Supervisor{cfg: cfg, log: cfg.Logger.With("job", cfg.Name), reqs: make(chan request)}
	s.status = Status{Name: cfg.Name, Store: cfg.Store, State: StateStarting}
	s.interval = cfg.Interval
	return s, nil
}

// RunDir is where a job's logs, events and state live inside its store.
func RunDir(storeDir string) string { return filepath.Join(storeDir, "run") }

// Status returns the job's current status.
func (s *Supervisor) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Trees = map[string]int{}
	for k, v := range s.status.Trees {
		st.Trees[k] = v
	}
	return st
}

// Request asks the running supervisor to checkpoint now ("checkpoint"),
// checkpoint and stop the job ("stop"), or swap it out and in ("swap-out",
// "swap-in"), and waits for the outcome.
func (s *Supervisor) Request(ctx context.Context, op string) (*checkpoint.Result, error) {
	switch op {
	case "checkpoint", "stop", "swap-out", "swap-in":
	default:
		return nil, fmt.Errorf("unknown request %q", op)
	}
	r := request{op: op, reply: make(chan reply, 1)}
	select {
	case s.reqs <- r:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case rep := <-r.reply:
		return rep.res, rep.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *Supervisor) emit(kind, detail string, gen int) {
	e := Event{Time: time.Now(), Job: s.cfg.Name, Kind: kind, Detail: detail, Gen: gen}
	// Events are reported through OnEvent; the log keeps them for -v.
	s.log.Debug(kind, "detail", detail, "generation", gen)
	if s.cfg.OnEvent != nil {
		s.cfg.OnEvent(e)
	}
}

func (s *Supervisor) setState(st State) {
	s.mu.Lock()
	s.status.State = st
	s.mu.Unlock()
}

// Run starts the job (or resumes it from the store's newest checkpoint of
// an unfinished run), supervises it until it completes, is stopped, or
// fails beyond MaxRestarts, and returns the job's exit code. Cancelling ctx
// stops supervision and kills the job (use Request "stop" to checkpoint
// first).
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
	// Orphans of a killed job become our children, so we can reap them and
	// free their PIDs for the restore.
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
	gens, _ := st.Generations()
	// Resume an unfinished run: one that was stopped, swapped out, killed
	// with its supervisor, or that failed (the node may be healthy now).
	resume := !s.cfg.Fresh && len(gens) > 0 && prev != nil && prev.State != StateCompleted
	if resume && !slices.EqualFunc(prev.Trees, s.cfg.Trees, func(a, b TreeSpec) bool { return slices.Equal(a.Argv, b.Argv) }) {
		return 1, fmt.Errorf("store %s holds a checkpoint of a different job (%q); use --fresh to start over, or another store", st.Dir, prev.Trees[0].Argv)
	}
	s.writeRunState(StateStarting, nil)
	if resume {
		if err := s.recover(ctx, "resuming the job from its last checkpoint"); err != nil {
			s.writeRunState(StateFailed, nil)
			return 1, err
		}
	} else if err := s.start(); err != nil {
		s.writeRunState(StateFailed, nil)
		return 1, err
	}
	return s.loop(ctx)
}

// start launches job-init with the trees.
func (s *Supervisor) start() error {
	run := RunDir(s.cfg.Store)
	events := filepath.Join(run, "events.jsonl")
	if off, err := fileSize(events); err == nil {
		s.eventsOff = off
	}
	spec := InitSpec{Trees: s.cfg.Trees, Events: events, Grace: s.cfg.Grace}
	if s.cfg.HeartbeatTimeout > 0 {
		hb := filepath.Join(run, "heartbeat")
		for i := range spec.Trees {
			spec.Trees[i].Env = append(envOrSelf(spec.Trees[i].Env), "CRYO_HEARTBEAT_FILE="+hb)
		}
		_ = os.WriteFile(hb, nil, 0o666)
	}
	b, _ := json.Marshal(spec)
	logf, err := os.OpenFile(filepath.Join(run, "init.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer devnull.Close()
	env := append(os.Environ(), InitEnv+"="+string(b))
	// syscall.StartProcess rather than os/exec: job-init must be a plain
	// child we wait for by PID, the same way after a restore.
	pid, err := syscall.ForkExec(s.cfg.Self, []string{"cryo", "job-init"}, &syscall.ProcAttr{
		Env:   env,
		Files: []uintptr{devnull.Fd(), logf.Fd(), logf.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return fmt.Errorf("start job-init: %w", err)
	}
	s.initPID = pid
	s.afterStart()
	s.emit("started", fmt.Sprintf("job-init pid %d", pid), 0)
	return nil
}

func envOrSelf(env []string) []string {
	if env == nil {
		return os.Environ()
	}
	return env
}

// afterStart resets the detectors for a fresh or restored job.
func (s *Supervisor) afterStart() {
	s.roots = map[int]string{}
	s.chans = newChannelWatch(s.cfg.ChannelGrace)
	s.hang = map[string]hangMark{}
	s.beat, s.stills = time.Now(), nil
	s.mem = memWatch{}
	s.hostExit = nil
	s.pending = failure{}
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
			if s.periodic() {
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
			s.readEvents()
			if s.initPID == 0 {
				continue // swapped out
			}
			var f failure
			if exited, code, how := s.reapInit(); exited {
				if code == 0 && s.hostExit != nil && *s.hostExit == 0 {
					s.setExit(StateCompleted, 0)
					s.emit("completed", "the job finished with exit code 0", 0)
					return 0, nil
				}
				f = failure{kind: "exit", detail: how, onset: time.Now()}
				if s.hostExit != nil {
					f.detail = fmt.Sprintf("host tree exited with code %d", *s.hostExit)
					f.onset = s.hostExitAt
				}
				if s.pending.kind != "" && s.pending.onset.Before(f.onset) {
					f.onset = s.pending.onset // an offload tree went first
				}
			} else if time.Since(lastSlow) >= time.Second {
				lastSlow = time.Now()
				f = s.detect()
			}
			if f.kind == "" {
				continue
			}
			code, done, err := s.fail(ctx, f)
			if done {
				return code, err
			}
			resetTimer()
		}
	}
}

func (s *Supervisor) setExit(st State, code int) {
	c := code
	s.mu.Lock()
	s.status.State = st
	s.status.ExitCode = &c
	s.mu.Unlock()
	s.writeRunState(st, &c)
}

// reapInit checks (without blocking) whether job-init has exited.
func (s *Supervisor) reapInit() (bool, int, string) {
	var ws syscall.WaitStatus
	pid, err := syscall.Wait4(s.initPID, &ws, syscall.WNOHANG, nil)
	if err == syscall.ECHILD {
		// Not our child (should not happen): fall back to existence.
		if proc.Exists(s.initPID) {
			return false, 0, ""
		}
		return true, 1, fmt.Sprintf("job-init (pid %d) disappeared", s.initPID)
	}
	if pid != s.initPID {
		return false, 0, ""
	}
	code, sig := exitCode(ws)
	how := fmt.Sprintf("job-init (pid %d) exited with code %d", s.initPID, code)
	if sig != "" {
		how = fmt.Sprintf("job-init (pid %d) was killed by %s", s.initPID, sig)
	}
	s.initPID = 0
	return true, code, how
}

// readEvents consumes new lines of job-init's events file.
func (s *Supervisor) readEvents() {
	f, err := os.Open(filepath.Join(RunDir(s.cfg.Store), "events.jsonl"))
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
		case "exited", "start-failed":
			delete(s.roots, e.PID)
			if s.isHost(e.Tree) {
				c := e.Code
				s.hostExit, s.hostExitAt = &c, e.Time
			} else if s.hostExit == nil {
				// An offload tree ended while the host still needs it.
				if e.Code != 0 || e.Event == "start-failed" {
					s.pending = failure{kind: "tree-exit", onset: e.Time,
						detail: fmt.Sprintf("offload tree %s (pid %d) %s", e.Tree, e.PID, describeExit(e))}
				}
			}
		}
	}
}

func describeExit(e InitEvent) string {
	if e.Event == "start-failed" {
		return "failed to start: " + e.Error
	}
	if e.Signal != "" {
		return "was killed by " + e.Signal
	}
	return fmt.Sprintf("exited with code %d", e.Code)
}

func (s *Supervisor) isHost(name string) bool {
	for _, t := range s.cfg.Trees {
		if t.Name == name {
			return t.Host
		}
	}
	return false
}

// periodic takes a scheduled checkpoint and adapts the interval. It
// returns false when the job looked unwell and the checkpoint was put off.
func (s *Supervisor) periodic() bool {
	if why := s.unwell(); why != "" {
		s.log.Debug("checkpoint put off", "why", why)
		return false
	}
	res, err := s.checkpoint(context.Background(), false)
	if err != nil || !s.cfg.AutoInterval {
		return true
	}
	s.cost.add(res.Frozen)
	s.interval = DalyInterval(s.cost.avg, s.cfg.MTBF)
	if s.interval < time.Second {
		s.interval = time.Second
	}
	s.log.Debug("interval", "cost", s.cost.avg, "mtbf", s.cfg.MTBF, "interval", s.interval)
	return true
}

// stillness is a time the job could not run because of cryo.
type stillness struct{ from, to time.Time }

// stood records that the job stood still from..to (a checkpoint).
func (s *Supervisor) stood(from, to time.Time) {
	s.stills = append(s.stills, stillness{from, to})
	s.rebaseHang()
	// Keep what the longest timeout can still look back on.
	for len(s.stills) > 0 && time.Since(s.stills[0].to) > 10*time.Minute {
		s.stills = s.stills[1:]
	}
}

// quietFor is how long the job has been able to run since t without
// showing progress: the time since t less the time it stood still by
// cryo's doing. Checkpoints may delay a timeout, never reset it.
func (s *Supervisor) quietFor(t time.Time) time.Duration {
	d := time.Since(t)
	for _, st := range s.stills {
		from := later(st.from, t)
		if st.to.After(from) {
			d -= st.to.Sub(from)
		}
	}
	return d
}

// unwell says why the job should not be checkpointed now (a checkpoint of
// a job that is already failing would be restored into the same failure):
// a failure seen but not yet handled, a channel broken within its grace
// period, a heartbeat or CPU progress half way to its timeout.
func (s *Supervisor) unwell() string {
	s.readEvents()
	if s.pending.kind != "" {
		return s.pending.detail
	}
	if s.chans != nil && len(s.chans.broken) > 0 {
		return "a channel between the trees looks broken"
	}
	// Judged on fresh readings: the detectors' own last look can be a
	// second old, which alone would make a job beating every second look
	// late.
	if s.cfg.HeartbeatTimeout > 0 {
		s.readBeat()
		if s.quietFor(s.beat) > s.cfg.HeartbeatTimeout/2 {
			return "the heartbeat is late"
		}
	}
	if s.cfg.HangTimeout > 0 {
		s.sampleHang(s.treePIDs())
		for name, m := range s.hang {
			if s.quietFor(m.since) > s.cfg.HangTimeout/2 {
				return "offload tree " + name + " has made no CPU progress lately"
			}
		}
	}
	return ""
}

// checkpoint takes a checkpoint of the running job; with kill the job is
// stopped once the checkpoint is committed. A failure leaves the job running.
func (s *Supervisor) checkpoint(ctx context.Context, kill bool) (*checkpoint.Result, error) {
	if s.initPID == 0 {
		return nil, errors.New("the job is not running")
	}
	t0 := time.Now()
	res, err := checkpoint.Take(ctx, checkpoint.Options{
		Store: s.cfg.Store, PID: s.initPID, Kill: kill, CRIU: s.cfg.CRIU, Keep: s.cfg.Keep,
		WorkDir: s.cfg.WorkDir, CheckCache: s.cfg.CheckCache, Logger: s.log, Reap: true, Replica: s.cfg.Replica,
	})
	// The job stood still meanwhile: do not count that against it.
	s.stood(t0, time.Now())
	if err != nil {
		if !proc.Exists(s.initPID) || s.hostExit != nil {
			// The job ended under the checkpoint: nothing was lost, and
			// the loop will see why it ended.
			return nil, fmt.Errorf("the job ended during the checkpoint: %w", err)
		}
		s.cfg.Metrics.CheckpointFailed(s.cfg.Name)
		s.emit("checkpoint-failed", err.Error(), 0)
		return nil, err
	}
	if missing := s.missingTrees(res); missing != "" {
		// A tree ended while the job was being dumped: this generation is
		// of a broken job and must never be restored.
		rerr := s.discard(res.Generation)
		err := fmt.Errorf("generation %d lacks %s: discarded", res.Generation, missing)
		if rerr != nil {
			err = errors.Join(err, rerr)
		}
		s.cfg.Metrics.CheckpointFailed(s.cfg.Name)
		s.emit("checkpoint-failed", err.Error(), 0)
		if s.pending.kind == "" {
			s.pending = failure{kind: "tree-exit", detail: missing + " vanished", onset: t0}
		}
		return nil, err
	}
	if s.genBegan == nil {
		s.genBegan = map[int]time.Time{}
	}
	s.genBegan[res.Generation] = t0
	s.cfg.Metrics.Checkpoint(s.cfg.Name, time.Since(t0), res.Frozen, res.RawBytes, res.NewBytes)
	s.mu.Lock()
	s.status.Generation = res.Generation
	s.status.Checkpoints++
	s.status.LastCheckpoint = time.Now()
	s.mu.Unlock()
	s.emit("checkpoint", fmt.Sprintf("generation %d: %d bytes of images, %d new, frozen %s", res.Generation, res.RawBytes, res.NewBytes, res.Frozen), res.Generation)
	if res.ReplicaError != "" {
		s.emit("replica-failed", fmt.Sprintf("generation %d is not in the replica: %s", res.Generation, res.ReplicaError), res.Generation)
	}
	if kill {
		s.initPID = 0
	}
	return res, nil
}

// began is when generation g's checkpoint began: remembered for the
// checkpoints this supervisor took, else derived from its manifest.
func (s *Supervisor) began(st *store.Store, g int) (time.Time, bool) {
	if t, ok := s.genBegan[g]; ok {
		return t, true
	}
	m, err := st.ReadManifest(g)
	if err != nil {
		return time.Time{}, false
	}
	return m.Created.Add(-time.Duration(m.Stats.DurableMS) * time.Millisecond), true
}

// missingTrees names the job's trees whose root is not in the checkpoint.
func (s *Supervisor) missingTrees(res *checkpoint.Result) string {
	if res.Manifest == nil {
		return ""
	}
	have := map[int]bool{}
	for _, p := range res.Manifest.Job.Processes {
		if p.PPID == res.Manifest.Job.RootPID {
			have[p.PID] = true
		}
	}
	var missing []string
	for pid, name := range s.roots {
		if !have[pid] {
			missing = append(missing, fmt.Sprintf("tree %s (pid %d)", name, pid))
		}
	}
	slices.Sort(missing)
	if len(missing) == 0 {
		return ""
	}
	return strings.Join(missing, ", ")
}

// discard removes a generation that must not be restored.
func (s *Supervisor) discard(gen int) error {
	st, err := store.Open(s.cfg.Store)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	unlock, err := st.Lock(ctx, true)
	if err != nil {
		return err
	}
	defer unlock()
	return st.Remove(gen)
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
				s.emit("stopped", "without a new checkpoint: the job was failing: "+why, 0)
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
			s.emit("stopped", fmt.Sprintf("checkpointed as generation %d and stopped", rep.res.Generation), rep.res.Generation)
			return 128 + int(syscall.SIGTERM), true, nil
		}
	case "swap-out":
		rep.res, rep.err = s.checkpoint(ctx, true)
		if rep.err == nil {
			s.setState(StateSwapped)
			s.writeRunState(StateSwapped, nil)
			s.emit("swapped-out", fmt.Sprintf("generation %d", rep.res.Generation), rep.res.Generation)
		}
	case "swap-in":
		if s.initPID != 0 {
			rep.err = errors.New("the job is not swapped out")
			break
		}
		rep.err = s.restoreNewest(ctx)
		if rep.err == nil {
			s.emit("swapped-in", fmt.Sprintf("job-init pid %d", s.initPID), 0)
		}
	}
	r.reply <- rep
	return 0, false, nil
}

// fail handles a detected failure: terminate, then restore with backoff,
// falling back to older generations; it returns done when giving up.
func (s *Supervisor) fail(ctx context.Context, f failure) (int, bool, error) {
	kind, detail := f.kind, f.detail
	s.cfg.Metrics.Failure(s.cfg.Name, kind)
	s.emit("failure", fmt.Sprintf("%s: %s", kind, detail), 0)
	s.mu.Lock()
	s.status.LastFailure = fmt.Sprintf("%s: %s", kind, detail)
	s.mu.Unlock()
	s.before = f.onset
	s.terminate()
	code := 1
	if s.hostExit != nil {
		code = *s.hostExit
	}
	if err := s.recover(ctx, detail); err != nil {
		s.setExit(StateFailed, code)
		s.emit("gave-up", err.Error(), 0)
		return code, true, err
	}
	return 0, false, nil
}

// recover restores the job, with backoff, up to MaxRestarts.
func (s *Supervisor) recover(ctx context.Context, why string) error {
	s.setState(StateRestoring)
	backoff := s.cfg.Backoff
	for {
		s.mu.Lock()
		n := s.status.Restarts
		s.mu.Unlock()
		if n >= s.cfg.MaxRestarts && why != "resuming the job from its last checkpoint" {
			return fmt.Errorf("%w after %d restarts; last failure: %s", ErrGaveUp, n, why)
		}
		if why != "resuming the job from its last checkpoint" {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(backoff):
			}
			s.mu.Lock()
			s.status.Restarts++
			s.mu.Unlock()
		}
		err := s.restoreNewest(ctx)
		if err == nil {
			return nil
		}
		if errors.Is(err, errAllCorrupt) {
			// Waiting will not mend a damaged store.
			return err
		}
		why = err.Error()
		backoff = min(2*backoff, 30*time.Second)
	}
}

// restoreNewest restores the newest generation that restores, falling back
// to older ones; with no generation at all it starts the job afresh.
func (s *Supervisor) restoreNewest(ctx context.Context) error {
	st, err := store.Open(s.cfg.Store)
	if err != nil {
		return err
	}
	gens, err := st.Generations()
	if err != nil {
		return err
	}
	if len(gens) == 0 {
		s.before = time.Time{}
		s.emit("restored", "no checkpoint yet: starting the job from the beginning", 0)
		return s.start()
	}
	var errs []error
	for i := len(gens) - 1; i >= 0; i-- {
		g := gens[i]
		if began, ok := s.began(st, g); ok && !s.before.IsZero() && !began.Before(s.before) {
			// Taken after the failure may have begun: it may hold the
			// fault. Never restore it, now or later.
			s.emit("warning", fmt.Sprintf("generation %d was taken after the failure may have begun (%s): discarded", g,
				s.before.Format("15:04:05.000")), g)
			if err := s.discard(g); err != nil {
				errs = append(errs, fmt.Errorf("discard generation %d: %w", g, err))
			}
			continue
		}
		// Events written after this point belong to the restored run.
		if off, err := fileSize(filepath.Join(RunDir(s.cfg.Store), "events.jsonl")); err == nil {
			s.eventsOff = off
		}
		res, err := restore.Restore(ctx, restore.Options{
			Store: s.cfg.Store, Generation: g, CRIU: s.cfg.CRIU, Sibling: true, Replica: s.cfg.Replica,
			WorkDir: s.cfg.WorkDir, CheckCache: s.cfg.CheckCache, Logger: s.log,
		})
		if err != nil {
			s.cfg.Metrics.Restore(s.cfg.Name, false)
			s.emit("restore-failed", fmt.Sprintf("generation %d: %v", g, err), g)
			errs = append(errs, fmt.Errorf("generation %d: %w", g, err))
			s.terminateLeftovers(g)
			continue
		}
		s.cfg.Metrics.Restore(s.cfg.Name, true)
		s.before = time.Time{}
		s.initPID = res.PID
		s.afterStart()
		if m, err := st.ReadManifest(g); err == nil {
			s.rootsFromManifest(m)
		}
		s.emit("restored", fmt.Sprintf("generation %d, job-init pid %d", g, res.PID), g)
		return nil
	}
	if len(errs) == 0 {
		// Every generation came after the failure began: start over.
		s.before = time.Time{}
		s.emit("restored", "no checkpoint from before the failure: starting the job from the beginning", 0)
		return s.start()
	}
	err = fmt.Errorf("no generation restores: %w", errors.Join(errs...))
	allCorrupt := true
	for _, e := range errs {
		allCorrupt = allCorrupt && errors.Is(e, store.ErrCorrupt)
	}
	if allCorrupt {
		err = fmt.Errorf("%w: %w", errAllCorrupt, err)
	}
	return err
}

// errAllCorrupt means every generation of the store failed verification.
var errAllCorrupt = errors.New("every checkpoint in the store is damaged")

// rootsFromManifest names the restored trees: job-init's children, matched
// with the names job-init recorded when it started them.
func (s *Supervisor) rootsFromManifest(m *store.Manifest) {
	names := map[int]string{}
	if f, err := os.Open(filepath.Join(RunDir(s.cfg.Store), "events.jsonl")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var e InitEvent
			if json.Unmarshal(sc.Bytes(), &e) == nil && e.Event == "started" {
				names[e.PID] = e.Tree
			}
		}
		f.Close()
	}
	for _, p := range m.Job.Processes {
		if p.PPID == m.Job.RootPID {
			if n, ok := names[p.PID]; ok {
				s.roots[p.PID] = n
				s.mu.Lock()
				s.status.Trees[n] = p.PID
				s.mu.Unlock()
			}
		}
	}
}

// terminate kills every process of the job and waits until their PIDs are
// free (reaping those that are our children).
func (s *Supervisor) terminate() {
	if s.initPID == 0 {
		return
	}
	pids, _ := proc.Tree(s.initPID)
	// Offload trees first, then the host, then job-init: the order matters
	// little with SIGKILL, but it keeps job-init from seeing a partial exit.
	for i := len(pids) - 1; i >= 0; i-- {
		_ = syscall.Kill(pids[i], syscall.SIGKILL)
	}
	reapGone(pids, 10*time.Second)
	s.initPID = 0
}

// terminateLeftovers kills what a failed restore of generation g may have
// left running.
func (s *Supervisor) terminateLeftovers(g int) {
	st, err := store.Open(s.cfg.Store)
	if err != nil {
		return
	}
	m, err := st.ReadManifest(g)
	if err != nil {
		return
	}
	var pids []int
	for _, p := range m.Job.Processes {
		if proc.Live(p.PID) {
			pids = append(pids, p.PID)
		}
	}
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	reapGone(pids, 10*time.Second)
}

// reapGone waits until every pid is gone, reaping our own children.
func reapGone(pids []int, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for _, p := range pids {
		for proc.Exists(p) && time.Now().Before(deadline) {
			var ws syscall.WaitStatus
			if got, _ := syscall.Wait4(p, &ws, syscall.WNOHANG, nil); got == p {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func (s *Supervisor) readRunState() *runState {
	b, err := os.ReadFile(filepath.Join(RunDir(s.cfg.Store), "state.json"))
	if err != nil {
		return nil
	}
	var rs runState
	if json.Unmarshal(b, &rs) != nil {
		return nil
	}
	return &rs
}

func (s *Supervisor) writeRunState(st State, code *int) {
	rs := runState{State: st, Trees: s.cfg.Trees, ExitCode: code, Updated: time.Now().UTC()}
	b, _ := json.MarshalIndent(rs, "", " ")
	p := filepath.Join(RunDir(s.cfg.Store), "state.json")
	if err := os.WriteFile(p+".tmp", b, 0o600); err == nil {
		_ = os.Rename(p+".tmp", p)
	}
}

func fileSize(p string) (int64, error) {
	st, err := os.Stat(p)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}
