package offload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// RecoverOptions are the inputs of Recover.
type RecoverOptions struct {
	Registry   *Registry
	JournalDir string
	Logger     *slog.Logger
}

// Recovered is what Recover did about one journal.
type Recovered struct {
	Journal   string             `json:"journal"`
	Op        string             `json:"op"`
	RootPID   int                `json:"root_pid,omitempty"`
	Contexts  []RecoveredContext `json:"contexts,omitempty"`
	Continued []int              `json:"continued,omitempty"` // job processes sent SIGCONT
	Done      bool               `json:"done"`                // everything is back; the journal is gone
	Err       string             `json:"error,omitempty"`
}

// RecoveredContext is one context of a recovered journal.
type RecoveredContext struct {
	Kind string `json:"kind"`
	PID  int    `json:"pid"`
	// From is the state found; To the state it was brought to. Gone means
	// the process no longer exists (nothing to do).
	From State `json:"from"`
	To   State `json:"to"`
	Gone bool  `json:"gone,omitempty"`
	// Interrupted is the step the killed cryo had begun on this context
	// ("lock", "checkpoint", "restore", "unlock"), if any.
	Interrupted string `json:"interrupted,omitempty"`
	Err         string `json:"error,omitempty"`
}

// Recover finishes what a killed cryo left half-done: for every journal in
// the directory whose writer is gone and that did not end, it continues
// the job's processes if they may have been left stopped, and brings each
// recorded context that still exists back to its initial state (restore
// with the journal's device map, then unlock). A journal whose contexts
// are all back (or gone) is removed; one that could not be finished stays,
// and its error is returned. Journals of a live cryo are left alone.
func Recover(ctx context.Context, o RecoverOptions) ([]Recovered, error) {
	log := orDiscard(o.Logger)
	files, err := journalFiles(o.JournalDir)
	if err != nil {
		return nil, fmt.Errorf("offload recover: %w", err)
	}
	var out []Recovered
	var errs []error
	for _, path := range files {
		r, err := recoverOne(ctx, o.Registry, path, log)
		if r == nil {
			continue // a live cryo's journal
		}
		if err != nil {
			r.Err = err.Error()
			errs = append(errs, fmt.Errorf("recover %s: %w", filepath.Base(path), err))
		}
		out = append(out, *r)
	}
	return out, errors.Join(errs...)
}

func recoverOne(ctx context.Context, reg *Registry, path string, log *slog.Logger) (*Recovered, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil // finished meanwhile
		}
		return &Recovered{Journal: path}, err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, nil // its cryo is still at work
		}
		return &Recovered{Journal: path}, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return &Recovered{Journal: path}, err
	}
	if _, serr := os.Stat(path); serr != nil {
		return nil, nil // removed by its writer between our open and lock
	}
	js, err := readJournal(b)
	r := &Recovered{Journal: path, Op: js.Op, RootPID: js.Job.RootPID}
	if err != nil {
		return r, fmt.Errorf("unreadable journal (left in place): %w", err)
	}
	if js.Ended {
		r.Done = true
		return r, os.Remove(path)
	}
	log.Info("recovering offload state a killed cryo left behind", "journal", path, "op", js.Op, "contexts", len(js.Contexts))

	if js.Stopped {
		// Continue first: a stopped process cannot run its driver thread.
		for _, p := range js.Job.Procs {
			st, err := proc.ReadStat(p.PID)
			if err != nil || (p.StartTime != 0 && st.StartTime != p.StartTime) {
				continue
			}
			if st.State == 'T' || st.State == 't' {
				if err := syscall.Kill(p.PID, syscall.SIGCONT); err == nil {
					r.Continued = append(r.Continued, p.PID)
				}
			}
		}
	}

	var errs []error
	for _, rec := range js.Contexts {
		rc := RecoveredContext{Kind: rec.Kind, PID: rec.PID, To: rec.Initial,
			Interrupted: js.LastIntent[fmt.Sprintf("%s/%d", rec.Kind, rec.PID)]}
		st, err := proc.ReadStat(rec.PID)
		if err != nil || (rec.StartTime != 0 && st.StartTime != rec.StartTime) {
			rc.Gone = true
			r.Contexts = append(r.Contexts, rc)
			continue
		}
		cs, err := reg.Attach([]Record{rec})
		if err == nil {
			rc.From, err = settle(ctx, cs[0], rec.Initial, js.Map, func(_ string, _ State, fn func() error) error { return fn() })
		}
		if errors.Is(err, ErrNoContext) {
			rc.Gone, err = true, nil
		}
		if err != nil {
			rc.Err = err.Error()
			errs = append(errs, &PhaseError{Phase: "recover", Kind: rec.Kind, PID: rec.PID, Err: err})
		} else {
			log.Info("offload context recovered", "kind", rec.Kind, "pid", rec.PID, "from", rc.From, "to", rc.To, "gone", rc.Gone)
		}
		r.Contexts = append(r.Contexts, rc)
	}
	if err := errors.Join(errs...); err != nil {
		return r, err
	}
	r.Done = true
	return r, os.Remove(path)
}
