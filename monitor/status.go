package monitor

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/outputs"
)

// Event is something that happened to a supervised job.
type Event struct {
	Time time.Time `json:"time"`
	Job  string    `json:"job"`
	// Kind is one of: started, resumed, checkpoint, checkpoint-failed,
	// failure, skipped, truncated, restored, restore-failed, completed,
	// exited, stopped, swapped-out, swapped-in, replica-failed, warning,
	// gave-up.
	Kind   string `json:"kind"`
	Detail string `json:"detail"`
	Gen    int    `json:"generation,omitempty"`
	// Checkpoint is the checkpoint's result, for kind "checkpoint".
	Checkpoint *checkpoint.Result `json:"checkpoint,omitempty"`
	// Cuts are the output files cut back, for kind "truncated".
	Cuts []outputs.Cut `json:"cuts,omitempty"`
}

// State of a supervised job.
type State string

// States.
const (
	StateStarting  State = "starting"
	StateRunning   State = "running"
	StateRestoring State = "restoring"
	StateSwapped   State = "swapped-out"
	// StateCompleted: the job ended with its own answer (ExitCode, which is
	// 0 for success); a later `cryo run` on the store starts afresh.
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

// RunStateFile is the file in the run directory (RunDir) where cryo run
// records its RunState.
const RunStateFile = "state.json"

// MaxRunState bounds what is read of a RunStateFile.
const MaxRunState = 1 << 20

// RunState is written to <store>/run/state.json so that a later `cryo run`
// knows whether to resume, and which generations never to restore; the
// Slurm Epilog and the Go API read it too, all through ParseRunState.
type RunState struct {
	State    State      `json:"state"`
	Trees    []TreeSpec `json:"trees"`
	ExitCode *int       `json:"exit_code,omitempty"`
	Updated  time.Time  `json:"updated"`
	// PassedOver are generations that may hold a fault (taken after a
	// failure began, or restored and failed again at once), with why:
	// they are kept in the store but never restored.
	PassedOver map[int]string `json:"passed_over,omitempty"`
}

// Status returns the job's current status.
func (s *Supervisor) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Trees = map[string]int{}
	for k, v := range s.status.Trees {
		// The node's PIDs, which people on the node can use; a tree of a
		// job in namespaces of its own not seen on the node yet is left
		// out until it is.
		if p := s.onNode(v); p != 0 {
			st.Trees[k] = p
		}
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
	rep, err := s.ask(ctx, request{op: op})
	if err != nil {
		return nil, err
	}
	return rep.res, rep.err
}

// ask hands r to the loop and waits for its reply; a reply that is there
// when ctx ends (the request ended supervision) still counts.
func (s *Supervisor) ask(ctx context.Context, r request) (reply, error) {
	r.reply = make(chan reply, 1)
	select {
	case s.reqs <- r:
	case <-ctx.Done():
		return reply{}, ctx.Err()
	}
	select {
	case rep := <-r.reply:
		return rep, nil
	case <-ctx.Done():
		select {
		case rep := <-r.reply:
			return rep, nil
		default:
			return reply{}, ctx.Err()
		}
	}
}

func (s *Supervisor) emit(e Event) {
	e.Time, e.Job = time.Now(), s.cfg.Name
	// Events are reported through OnEvent; the log keeps them for -v.
	s.log.Debug(e.Kind, "detail", e.Detail, "generation", e.Gen)
	if s.watch != nil {
		s.watch.event(e)
	}
	if s.cfg.OnEvent != nil {
		s.cfg.OnEvent(e)
	}
}

func (s *Supervisor) event(kind, detail string, gen int) {
	s.emit(Event{Kind: kind, Detail: detail, Gen: gen})
}

func (s *Supervisor) setState(st State) {
	s.mu.Lock()
	s.status.State = st
	s.mu.Unlock()
}

func (s *Supervisor) setExit(st State, code int) {
	c := code
	s.mu.Lock()
	s.status.State = st
	s.status.ExitCode = &c
	s.mu.Unlock()
	s.writeRunState(st, &c)
}

// ParseRunState is the one reader of a RunStateFile's contents.
func ParseRunState(b []byte) (*RunState, error) {
	if len(b) > MaxRunState {
		return nil, fmt.Errorf("%s: %d bytes, more than a run state has", RunStateFile, len(b))
	}
	var rs RunState
	if err := json.Unmarshal(b, &rs); err != nil {
		return nil, fmt.Errorf("%s: %w", RunStateFile, err)
	}
	return &rs, nil
}

func (s *Supervisor) readRunState() *RunState {
	b, err := os.ReadFile(filepath.Join(RunDir(s.cfg.Store), RunStateFile))
	if err != nil {
		return nil
	}
	rs, err := ParseRunState(b)
	if err != nil {
		return nil
	}
	return rs
}

func (s *Supervisor) writeRunState(st State, code *int) {
	rs := RunState{State: st, Trees: s.cfg.Trees, ExitCode: code, Updated: time.Now().UTC(), PassedOver: s.pol.faulty()}
	b, _ := json.MarshalIndent(rs, "", " ")
	p := filepath.Join(RunDir(s.cfg.Store), RunStateFile)
	// The job can write the run directory: a link it left in the place of
	// the temporary file is refused, not followed.
	f, err := os.OpenFile(p+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		s.log.Warn("run state", "err", err)
		return
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil && cerr == nil {
		_ = os.Rename(p+".tmp", p)
	}
}
