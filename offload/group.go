package offload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// DefaultLockTimeout is how long a lock may wait for offload work in flight
// to drain when the caller does not say.
const DefaultLockTimeout = 30 * time.Second

// ErrNoContext means a process holds no context of the kind asked for (it
// exited, or its PID now names another process). Drivers wrap it.
var ErrNoContext = errors.New("no such offload context")

// Group is the offload contexts of one job, moved together through the
// state machine by one cryo operation, with an intent journal. Its methods
// are safe to call on a Group with no contexts (a job without offload
// state), and then do nothing.
type Group struct {
	members []*member
	j       *Journal
	log     *slog.Logger
	m       DeviceMap // where Restore puts devices (restore operations)
	reg     *Registry // the drivers the contexts came from (Rebind)
	// unsettled is set when a context could not be brought back; Close then
	// keeps the journal for Recover.
	unsettled bool
	// unbound is set while the contexts' PIDs are those of a job that comes
	// back in fresh PID namespaces, until Rebind gives them their new ones.
	unbound bool
}

type member struct {
	c   Context
	rec Record
}

// QuiesceOptions are the inputs of Quiesce.
type QuiesceOptions struct {
	Registry *Registry
	// Job is the job's processes; contexts are looked for in all of them.
	Job JobRef
	// LockTimeout bounds each context's lock (0: DefaultLockTimeout).
	LockTimeout time.Duration
	// JournalDir is where the intent journal is written ("" for none).
	JournalDir string
	// Stops says the caller will leave the job's processes stopped for a
	// while (a checkpoint with --kill): the journal is then kept even for
	// a job without offload contexts, so that if cryo is killed meanwhile,
	// Recover continues the job instead of leaving it stopped for good.
	Stops  bool
	Logger *slog.Logger
}

// Quiesce finds the offload contexts of a job, locks them all in parallel,
// then checkpoints them all in parallel, so that their device state is in
// the job's host memory for CRIU to dump. Contexts already locked or
// checkpointed by someone else are left at that state and brought back to
// it afterwards.
//
// If any step fails, Quiesce undoes what it did, in reverse (restore, then
// unlock), so the job runs as before, and returns a *PhaseError naming the
// phase and context that failed (joined with any undo failure). On success
// the caller owns the Group: it must call Resume (to let the job run on) or
// leave the contexts checkpointed for good (the job is killed), and Close.
func Quiesce(ctx context.Context, o QuiesceOptions) (*Group, error) {
	g := &Group{log: orDiscard(o.Logger)}
	var pids []int
	for _, p := range o.Job.Procs {
		pids = append(pids, p.PID)
	}
	cs, err := o.Registry.Discover(ctx, pids)
	if err != nil {
		return nil, err
	}
	if len(cs) == 0 {
		if o.Stops && o.JournalDir != "" {
			if g.j, err = OpenJournal(o.JournalDir, "checkpoint", o.Job, nil); err != nil {
				return nil, err
			}
		}
		return g, nil
	}
	for _, c := range cs {
		rec := c.Record()
		st, err := c.State(ctx)
		if err != nil {
			return nil, &PhaseError{Phase: "discover", Kind: rec.Kind, PID: rec.PID, Err: err}
		}
		if st == Failed {
			return nil, &PhaseError{Phase: "discover", Kind: rec.Kind, PID: rec.PID, Err: ErrContextFailed}
		}
		rec.Initial = st
		if rec.StartTime == 0 {
			rec.StartTime = startTime(rec.PID)
		}
		g.members = append(g.members, &member{c: c, rec: rec})
	}
	if o.JournalDir != "" {
		if g.j, err = OpenJournal(o.JournalDir, "checkpoint", o.Job, nil); err != nil {
			return nil, err
		}
	}
	if err := g.noteContexts(); err != nil {
		return nil, errors.Join(err, g.j.Close())
	}
	timeout := o.LockTimeout
	if timeout <= 0 {
		timeout = DefaultLockTimeout
	}
	g.log.Debug("locking offload contexts", "contexts", len(g.members), "timeout", timeout)
	t0 := time.Now()
	if err := firstErr(g.parallel(func(m *member) error {
		if m.rec.Initial != Running {
			return nil
		}
		return g.step(m, "lock", Locked, func() error { return m.c.Lock(ctx, timeout) })
	})); err != nil {
		if errors.Is(err, ErrLockTimeout) {
			err = fmt.Errorf("%w (offload work in flight did not drain within %s)", err, timeout)
		}
		return nil, g.undo(ctx, err)
	}
	g.log.Debug("locked", "took", time.Since(t0))
	t1 := time.Now()
	if err := firstErr(g.parallel(func(m *member) error {
		if m.rec.Initial == Checkpointed {
			return nil
		}
		return g.step(m, "checkpoint", Checkpointed, func() error { return m.c.Checkpoint(ctx) })
	})); err != nil {
		return nil, g.undo(ctx, err)
	}
	g.log.Debug("checkpointed offload contexts", "took", time.Since(t1))
	return g, nil
}

// undo brings every context back after a failed Quiesce and closes the
// journal (keeps it when undo failed too).
func (g *Group) undo(ctx context.Context, cause error) error {
	// A cancelled ctx must not stop the undo: the job would stay locked.
	uctx := context.WithoutCancel(ctx)
	rerr := g.Resume(uctx)
	if rerr != nil {
		rerr = fmt.Errorf("and undoing it failed too (run `cryo recover` on this store): %w", rerr)
		return errors.Join(cause, rerr, g.Close())
	}
	return errors.Join(fmt.Errorf("%w; undone: the job runs on as before", cause), g.Close())
}

// AttachOptions are the inputs of Attach.
type AttachOptions struct {
	Registry *Registry
	// Records are the contexts of a checkpoint, as recorded.
	Records []Record
	// Map says where Resume puts each recorded device.
	Map DeviceMap
	// Job is the job's processes (PIDs; start times may be 0 until the
	// job exists).
	Job        JobRef
	JournalDir string
	// Rebind says the job comes back in fresh PID namespaces: the records'
	// PIDs are those it had on the node, which name other processes, or
	// none, once it is restored. Until Rebind gives the contexts the PIDs
	// of the restored processes, the journal names none of them (a killed
	// cryo's Recover must not touch whatever holds the old PIDs), and
	// Refresh and Resume refuse.
	Rebind bool
	Logger *slog.Logger
}

// Attach prepares the recorded contexts of a checkpoint for a restore: it
// finds their drivers and opens the journal, before CRIU brings the job
// back. After the CRIU restore the caller calls Refresh, then Resume, which
// restores every context (with the device map) and unlocks it, and Close.
func Attach(ctx context.Context, o AttachOptions) (*Group, error) {
	g := &Group{log: orDiscard(o.Logger), m: o.Map, reg: o.Registry, unbound: o.Rebind && len(o.Records) > 0}
	if len(o.Records) == 0 {
		return g, nil
	}
	cs, err := o.Registry.Attach(o.Records)
	if err != nil {
		return nil, err
	}
	for i, c := range cs {
		rec := o.Records[i]
		rec.Initial = Running // a restored job runs, whatever it was doing when dumped
		rec.StartTime = 0     // not known until CRIU restores the process
		g.members = append(g.members, &member{c: c, rec: rec})
	}
	if o.JournalDir != "" {
		if g.j, err = OpenJournal(o.JournalDir, "restore", o.Job, o.Map); err != nil {
			return nil, err
		}
	}
	if err := g.noteContexts(); err != nil {
		return nil, errors.Join(err, g.j.Close())
	}
	return g, nil
}

// Rebind points the contexts at the PIDs their processes have after a
// restore that gave them new ones (a job brought back in fresh PID
// namespaces, see AttachOptions.Rebind): pid returns the PID a context's
// process has now, or an error when it has none (it was not restored). Call
// it after CRIU restored the job, before Refresh. It fails, naming the
// context, on the first it cannot rebind; the group then stays unbound.
func (g *Group) Rebind(pid func(Record) (int, error)) error {
	if g.Len() == 0 {
		return nil
	}
	pids := make([]int, len(g.members))
	for i, m := range g.members {
		p, err := pid(m.rec)
		if err == nil && p <= 0 {
			err = fmt.Errorf("no PID for it (%d)", p)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", m.rec, err)
		}
		pids[i] = p
	}
	for i, m := range g.members {
		rec := m.rec
		rec.PID = pids[i]
		cs, err := g.reg.Attach([]Record{rec})
		if err != nil {
			return fmt.Errorf("%s: %w", rec, err)
		}
		m.c, m.rec = cs[0], rec
	}
	g.unbound = false
	return g.noteContexts()
}

// errUnbound is Refresh's and Resume's answer before a needed Rebind.
var errUnbound = errors.New("offload contexts not yet rebound to the restored processes")

// Refresh records the start times of the processes that hold the contexts,
// once they exist (after CRIU restored them).
func (g *Group) Refresh() error {
	if g.Len() > 0 && g.unbound {
		return errUnbound
	}
	for _, m := range g.members {
		m.rec.StartTime = startTime(m.rec.PID)
	}
	return g.noteContexts()
}

// Len is the number of contexts.
func (g *Group) Len() int {
	if g == nil {
		return 0
	}
	return len(g.members)
}

// Records describes the contexts, as discovered (with the state each had
// before cryo touched it).
func (g *Group) Records() []Record {
	if g == nil {
		return nil
	}
	out := make([]Record, 0, len(g.members))
	for _, m := range g.members {
		out = append(out, m.rec)
	}
	return out
}

// Resume brings every context back to the state it had before Quiesce (for
// an attached group: Running), in parallel: restore where checkpointed (onto
// the group's device map), then unlock. It asks each context where it
// stands first, so it may be called again after a partial failure.
func (g *Group) Resume(ctx context.Context) error {
	if g.Len() == 0 {
		return nil
	}
	if g.unbound {
		return errUnbound
	}
	t0 := time.Now()
	errs := g.parallel(func(m *member) error { return g.settle(ctx, m) })
	err := errors.Join(errs...)
	if err != nil {
		g.unsettled = true
	} else {
		g.unsettled = false
		g.log.Debug("offload contexts resumed", "contexts", len(g.members), "took", time.Since(t0))
	}
	return err
}

// Forget tells the group that its contexts are gone (their processes were
// killed): nothing is left to recover, and Close removes the journal.
func (g *Group) Forget() {
	if g != nil {
		g.unsettled = false
	}
}

// NoteStopped records that the job's processes may be left stopped (CRIU
// leave-stopped), so that recovery continues them.
func (g *Group) NoteStopped() error {
	if g == nil {
		return nil
	}
	return g.j.Note("stopped")
}

// NoteContinued records that the job's processes run again.
func (g *Group) NoteContinued() error {
	if g == nil {
		return nil
	}
	return g.j.Note("continued")
}

// Close ends the operation: it removes the journal, unless a context could
// not be brought back (then the journal stays for Recover).
func (g *Group) Close() error {
	if g == nil || g.j == nil {
		return nil
	}
	j := g.j
	g.j = nil
	if g.unsettled {
		g.log.Warn("offload contexts not all back to their state; journal kept for `cryo recover`", "journal", j.Path())
		return j.Abandon()
	}
	return j.Close()
}

func (g *Group) noteContexts() error {
	if g.unbound {
		return nil // their PIDs name no process of the job (yet)
	}
	for _, m := range g.members {
		rec := m.rec
		if err := g.j.append(Entry{Event: "context", Context: &rec}); err != nil {
			return err
		}
	}
	return nil
}

// step journals and runs one state change of a context.
func (g *Group) step(m *member, action string, to State, fn func() error) error {
	if err := g.j.append(Entry{Event: "intent", Kind: m.rec.Kind, PID: m.rec.PID, Action: action}); err != nil {
		return &PhaseError{Phase: action, Kind: m.rec.Kind, PID: m.rec.PID, Err: err}
	}
	t0 := time.Now()
	if err := fn(); err != nil {
		_ = g.j.append(Entry{Event: "failed", Kind: m.rec.Kind, PID: m.rec.PID, Action: action, Err: err.Error()})
		return &PhaseError{Phase: action, Kind: m.rec.Kind, PID: m.rec.PID, Err: err}
	}
	g.log.Debug("offload "+action, "kind", m.rec.Kind, "pid", m.rec.PID, "took", time.Since(t0))
	st := to
	return g.j.append(Entry{Event: "done", Kind: m.rec.Kind, PID: m.rec.PID, Action: action, State: &st})
}

// settle moves one context back towards its initial state.
func (g *Group) settle(ctx context.Context, m *member) error {
	_, err := settle(ctx, m.c, m.rec.Initial, g.m, func(action string, to State, fn func() error) error {
		return g.step(m, action, to, fn)
	})
	if err != nil {
		var pe *PhaseError
		if !errors.As(err, &pe) {
			err = &PhaseError{Phase: "state", Kind: m.rec.Kind, PID: m.rec.PID, Err: err}
		}
	}
	return err
}

// depth orders the states from Running (0) to Checkpointed (2).
func depth(s State) int {
	switch s {
	case Running:
		return 0
	case Locked:
		return 1
	case Checkpointed:
		return 2
	}
	return -1
}

// settle asks where c stands and moves it back to want: restore if
// checkpointed, then unlock if want is Running. It never moves a context
// forward. It returns the state found.
func settle(ctx context.Context, c Context, want State, m DeviceMap, step func(action string, to State, fn func() error) error) (State, error) {
	from, err := c.State(ctx)
	if err != nil {
		return from, err
	}
	if from == Failed {
		return from, ErrContextFailed
	}
	st := from
	for depth(st) > depth(want) {
		switch st {
		case Checkpointed:
			err = step("restore", Locked, func() error { return c.Restore(ctx, m) })
			st = Locked
		case Locked:
			err = step("unlock", Running, func() error { return c.Unlock(ctx) })
			st = Running
		}
		if err != nil {
			return from, err
		}
	}
	return from, nil
}

// parallel runs fn for every member at once and returns their errors.
func (g *Group) parallel(fn func(m *member) error) []error {
	errs := make([]error, len(g.members))
	var wg sync.WaitGroup
	for i, m := range g.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(m)
		}()
	}
	wg.Wait()
	return errs
}

// firstErr returns the first error of a list, joined with the others.
func firstErr(errs []error) error {
	var out []error
	for _, e := range errs {
		if e != nil {
			out = append(out, e)
		}
	}
	if len(out) == 0 {
		return nil
	}
	if len(out) == 1 {
		return out[0]
	}
	return errors.Join(out...)
}

func startTime(pid int) uint64 {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return 0
	}
	return st.StartTime
}

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return l
}
