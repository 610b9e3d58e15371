package monitor

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// periodic takes a scheduled checkpoint and adapts the interval. It
// returns false when the job looked unwell and the checkpoint was put off.
func (s *Supervisor) periodic(ctx context.Context) bool {
	if why := s.unwell(); why != "" {
		s.log.Debug("checkpoint put off", "why", why)
		return false
	}
	res, err := s.checkpoint(ctx, false)
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
	if s.hostEnd != nil {
		return "the host tree has ended"
	}
	if s.chans != nil && len(s.chans.broken) > 0 {
		return "a channel between the trees looks broken"
	}
	// Judged on fresh readings: the detectors' own last look can be a
	// second old, which alone would make a job beating every second look
	// late.
	if s.cfg.HeartbeatTimeout > 0 {
		s.beat.look(time.Now())
		if s.quietFor(s.beat.seen) > s.cfg.HeartbeatTimeout/2 {
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

// lastWell is the last time the job was seen well by the detectors that
// notice a failure only at a timeout (heartbeat, hang): retention keeps a
// generation from before it. Zero when neither watches.
func (s *Supervisor) lastWell() time.Time {
	var t time.Time
	if s.cfg.HeartbeatTimeout > 0 {
		t = s.beat.well
	}
	if s.cfg.HangTimeout > 0 {
		for _, m := range s.hang {
			if t.IsZero() || m.progress.Before(t) {
				t = m.progress
			}
		}
	}
	return t
}

// checkpoint takes a checkpoint of the running job; with kill the job is
// stopped once the checkpoint is committed. A failure leaves the job
// running. A generation of a broken job (a tree is missing from it, or
// the job failed while it was dumped) is refused before it is committed,
// so it is never stored and retention never counts it.
func (s *Supervisor) checkpoint(ctx context.Context, kill bool) (*checkpoint.Result, error) {
	if s.initPID == 0 {
		return nil, errors.New("the job is not running")
	}
	t0 := time.Now()
	res, err := s.eng.Checkpoint(ctx, s.initPID, kill, s.accept)
	// The job stood still meanwhile: do not count that against it.
	s.stood(t0, time.Now())
	if err != nil {
		s.cfg.Metrics.CheckpointFailed(s.cfg.Name)
		if errors.Is(err, checkpoint.ErrRefused) {
			s.event("checkpoint-failed", err.Error()+": not committed", 0)
			if s.pending.kind == "" {
				s.pending = failure{kind: kindTree, detail: err.Error(), onset: t0}
			}
			return nil, err
		}
		if s.hostEnd != nil || !s.jobAlive() {
			// The job ended under the checkpoint: nothing was lost, and
			// the loop will see why it ended.
			return nil, fmt.Errorf("the job ended during the checkpoint: %w", err)
		}
		s.event("checkpoint-failed", brief(err), 0)
		return nil, err
	}
	s.genBegan[res.Generation] = t0
	s.pol.checkpointed()
	s.cfg.Metrics.Checkpoint(s.cfg.Name, time.Since(t0), res.Frozen, res.RawBytes, res.NewBytes)
	s.mu.Lock()
	s.status.Generation = res.Generation
	s.status.Checkpoints++
	s.status.LastCheckpoint = time.Now()
	s.mu.Unlock()
	s.emit(Event{Kind: "checkpoint", Gen: res.Generation, Checkpoint: res,
		Detail: fmt.Sprintf("generation %d: %d bytes of images, %d new, frozen %s, durable after %s",
			res.Generation, res.RawBytes, res.NewBytes, res.Frozen, res.Durable.Round(time.Millisecond))})
	if res.ReplicaError != "" {
		s.event("replica-failed", fmt.Sprintf("generation %d is not in the replica: %s", res.Generation, res.ReplicaError), res.Generation)
	}
	if kill {
		s.initPID = 0
	}
	s.retain()
	if s.standby != nil {
		s.standby.Notify(res.Generation)
	}
	return res, nil
}

func (s *Supervisor) jobAlive() bool { return s.initPID != 0 && proc.Live(s.initPID) }

// accept decides whether a dumped generation may be committed: every tree
// of the job must be in it, and the job must not have failed meanwhile.
func (s *Supervisor) accept(d checkpoint.Dumped) error {
	s.readEvents()
	if s.pending.kind != "" {
		return fmt.Errorf("the job failed while it was dumped: %s", s.pending.detail)
	}
	if missing := missingTrees(s.roots, d); missing != "" {
		return fmt.Errorf("the generation lacks %s, which ended while the job was dumped", missing)
	}
	return nil
}

// jobRoot is the PID of a checkpointed job's root as its images name it:
// the first process CRIU lists, which is 1 for a job in a PID namespace of
// its own, where rootPID (what was checkpointed) is the node's PID.
func jobRoot(procs []store.Process, rootPID int) int {
	if len(procs) > 0 {
		return procs[0].PID
	}
	return rootPID
}

// missingTrees names the job's trees (roots: pid -> name) whose root is
// not a child of the dumped job's root.
func missingTrees(roots map[int]string, d checkpoint.Dumped) string {
	have := map[int]bool{}
	root := jobRoot(d.Processes, d.RootPID)
	for _, p := range d.Processes {
		if p.PPID == root {
			have[p.PID] = true
		}
	}
	var missing []string
	for pid, name := range roots {
		if !have[pid] {
			missing = append(missing, fmt.Sprintf("tree %s (pid %d)", name, pid))
		}
	}
	slices.Sort(missing)
	return strings.Join(missing, ", ")
}

// generations lists the store's generations, dated by our own clock where
// we took them.
func (s *Supervisor) generations() ([]Generation, error) {
	gens, err := s.eng.Generations()
	if err != nil {
		return nil, err
	}
	for i := range gens {
		if t, ok := s.genBegan[gens[i].N]; ok {
			gens[i].Began = t
		} else if gens[i].Began.IsZero() || gens[i].Began.After(s.began) {
			// Taken before this supervisor began, whatever the clock of
			// the node that took it said.
			gens[i].Began = s.began
		}
	}
	return gens, nil
}

// retain applies retention (see retain in policy.go).
func (s *Supervisor) retain() {
	if s.cfg.Keep <= 0 {
		return
	}
	gens, err := s.generations()
	if err != nil {
		s.log.Warn("retention", "err", err)
		return
	}
	rm := retain(gens, s.cfg.Keep, s.pol.passed, s.lastWell())
	if len(rm) == 0 {
		return
	}
	if err := s.eng.Remove(rm); err != nil {
		s.log.Warn("retention", "err", err)
		return
	}
	for _, g := range rm {
		delete(s.genBegan, g)
		delete(s.pol.passed, g)
	}
	s.log.Debug("retention", "removed", rm)
}
