package monitor

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
)

// fail handles a detected failure: end the job, then bring it back as the
// policy says; it returns done when giving up.
func (s *Supervisor) fail(ctx context.Context, f failure) (int, bool, error) {
	s.cfg.Metrics.Failure(s.cfg.Name, f.kind)
	s.event("failure", f.String(), 0)
	s.mu.Lock()
	s.status.LastFailure = f.String()
	s.mu.Unlock()
	// Every process of the job ends, and is reaped, before a restore.
	s.terminate()
	s.pol.failed(f)
	if err := s.recover(ctx, &f); err != nil {
		code := 1
		if f.kind == kindExit {
			code = f.code
		}
		s.setExit(StateFailed, code)
		s.event("gave-up", err.Error(), 0)
		return code, true, err
	}
	return 0, false, nil
}

// recover brings the job back after the failure f, or resumes it (f nil:
// a new run on the store, or a swap-in): from the newest generation the
// policy allows, falling back to older ones, or from the beginning; with
// backoff between attempts, up to MaxRestarts (a resume's first attempt
// does not count).
func (s *Supervisor) recover(ctx context.Context, f *failure) error {
	s.setState(StateRestoring)
	last := "resuming"
	if f != nil {
		last = f.String()
	}
	free := f == nil
	for {
		if !free {
			wait, ok := s.pol.attempt()
			if !ok {
				return fmt.Errorf("%w after %d restarts; last failure: %s", ErrGaveUp, s.pol.restarts, last)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
			s.mu.Lock()
			s.status.Restarts = s.pol.restarts
			s.mu.Unlock()
		}
		free = false
		retry, err := s.attempt(ctx)
		if err == nil {
			return nil
		}
		if !retry {
			return err
		}
		last = brief(err)
	}
}

// attempt makes one attempt to bring the job back: generations are tried
// newest first until one restores, one fails in a way that may pass
// (retry after the backoff), or none is left. Each failure is reported
// once, in one line; the one that ends supervision only in the error.
func (s *Supervisor) attempt(ctx context.Context) (retry bool, err error) {
	waiting := false // for an address in use: reported once
	for {
		gens, err := s.generations()
		if err != nil {
			return true, err
		}
		c := s.pol.choose(gens)
		s.reportPassed(c)
		switch {
		case c.giveUp:
			return false, fmt.Errorf("%w: %s; the store is kept: remove the cause and run again, or start over with --fresh", ErrGaveUp, c.why)
		case c.fresh:
			s.event("restored", c.why+": starting the job from the beginning", 0)
			if err := s.start(ctx); err != nil {
				return true, err
			}
			s.pol.restored(0, time.Now())
			return false, nil
		}
		err = s.restoreGen(ctx, c.gen)
		if err == nil {
			return false, nil
		}
		s.cfg.Metrics.Restore(s.cfg.Name, false)
		v := s.pol.restoreFailed(c.gen, err, time.Now())
		if v == waitRetry {
			if !waiting {
				waiting = true
				s.event("restore-failed", fmt.Sprintf("%s; trying again every %s for up to %s", genBrief(c.gen, err), addrRetry, AddrWait), c.gen)
			}
			select {
			case <-ctx.Done():
				return false, ctx.Err()
			case <-time.After(addrRetry):
			}
			continue
		}
		if v == stop {
			return false, fmt.Errorf("%w: generation %d cannot be restored on this node now: %s; cryo never signals processes outside the job: run again once they are gone",
				ErrGaveUp, c.gen, brief(err))
		}
		if v == tryOlder {
			if next := s.pol.choose(gens); next.giveUp {
				// Nothing else will be tried: this is the last word.
				return false, fmt.Errorf("%w: %s; %s; the store is kept: remove the cause and run again, or start over with --fresh",
					ErrGaveUp, genBrief(c.gen, err), next.why)
			}
		}
		s.event("restore-failed", genBrief(c.gen, err), c.gen)
		if v == retryLater {
			return true, fmt.Errorf("generation %d: %w", c.gen, err)
		}
	}
}

// reportPassed says, once per generation, why generations are passed over.
func (s *Supervisor) reportPassed(c choice) {
	gens := make([]int, 0, len(s.pol.passed))
	for g, ps := range s.pol.passed {
		if ps.fault && !s.reported[g] {
			gens = append(gens, g)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(gens)))
	for _, g := range gens {
		s.reported[g] = true
		s.event("skipped", fmt.Sprintf("generation %d: %s: passed over, kept in the store", g, s.pol.passed[g].why), g)
	}
}

// restoreGen restores generation g and resets the detectors for it.
func (s *Supervisor) restoreGen(ctx context.Context, g int) error {
	// Events written after this point belong to the restored run.
	if off, err := fileSize(s.eventsFile()); err == nil {
		s.eventsOff = off
	}
	res, err := s.eng.Restore(ctx, g)
	if err != nil {
		// What a failed restore left (CRIU's restored root, as our child,
		// and below it) ends before anything else is tried.
		j := JobProcs{PIDs: s.pidsOf(g)}
		if terr := s.eng.Terminate(j); terr != nil {
			s.event("warning", "after a failed restore: "+terr.Error(), g)
		}
		return err
	}
	s.cfg.Metrics.Restore(s.cfg.Name, true)
	s.initPID = res.PID
	s.afterStart()
	s.rootsFromRestore(res)
	s.pol.restored(g, time.Now())
	if len(res.Cuts) > 0 {
		var parts []string
		for _, c := range res.Cuts {
			parts = append(parts, c.String())
		}
		s.emit(Event{Kind: "truncated", Gen: g, Cuts: res.Cuts,
			Detail: fmt.Sprintf("cut back to generation %d's checkpoint, so the restored job's output follows on once: %s", g, strings.Join(parts, ", "))})
	}
	if res.CutError != "" {
		s.event("warning", "output files not cut back to the checkpoint: "+res.CutError, g)
	}
	s.event("restored", fmt.Sprintf("generation %d, job-init pid %d, in %s", g, res.PID, res.Took.Round(time.Millisecond)), g)
	return nil
}

// pidsOf lists the PIDs of generation g's processes.
func (s *Supervisor) pidsOf(g int) []int {
	gens, _ := s.eng.Generations()
	for _, gen := range gens {
		if gen.N == g {
			return gen.PIDs
		}
	}
	return nil
}

// startedTrees reads the names job-init gave the trees it started, by PID,
// from its events file (they keep their PIDs across restores).
func (s *Supervisor) startedTrees() map[int]string {
	names := map[int]string{}
	f, err := os.Open(s.eventsFile())
	if err != nil {
		return names
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e InitEvent
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Event == "started" {
			names[e.PID] = e.Tree
		}
	}
	return names
}

// rootsFromRestore names the restored trees: job-init's children, matched
// with the names job-init recorded when it started them.
func (s *Supervisor) rootsFromRestore(res *Restored) {
	names := s.startedTrees()
	root := jobRoot(res.Processes, res.RootPID)
	for _, p := range res.Processes {
		if p.PPID == root {
			if n, ok := names[p.PID]; ok {
				s.roots[p.PID] = n
				if !s.cfg.Namespaces {
					// (Inside the job's own namespace a PID is no session
					// of the node's: treePIDs records the job's real ones.)
					s.sessions[p.PID] = true
				}
				s.mu.Lock()
				s.status.Trees[n] = p.PID
				s.mu.Unlock()
			}
		}
	}
}

// genBrief is brief for a failed restore of generation g, which it names
// first (once).
func genBrief(g int, err error) string {
	return fmt.Sprintf("generation %d: %s", g, strings.TrimPrefix(brief(err), fmt.Sprintf("restore generation %d: ", g)))
}

// brief is a one-line account of err for events: CRIU's one line that
// matters and its log's path, or the error's first line.
func brief(err error) string {
	var ce *criu.Error
	if errors.As(err, &ce) {
		return ce.Brief()
	}
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}
