package offload

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// fakeCtx is an offload context that follows the state machine strictly
// and records every call in a shared log.
type fakeCtx struct {
	mu  sync.Mutex
	rec Record
	st  State
	log *callLog
	// fail makes a step fail (and leaves the state as it was).
	fail     map[string]error
	restored DeviceMap
}

type callLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *callLog) add(s string) {
	l.mu.Lock()
	l.calls = append(l.calls, s)
	l.mu.Unlock()
}

func (l *callLog) list() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.calls...)
}

func (c *fakeCtx) Record() Record { return c.rec }

func (c *fakeCtx) State(context.Context) (State, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st, nil
}

func (c *fakeCtx) move(action string, from, to State) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.fail[action]; err != nil {
		c.log.add(fmt.Sprintf("%s! %d", action, c.rec.PID)) // a failed call
		return err
	}
	c.log.add(fmt.Sprintf("%s %d", action, c.rec.PID))
	if c.st != from {
		return fmt.Errorf("illegal %s in state %v", action, c.st)
	}
	c.st = to
	return nil
}

func (c *fakeCtx) Lock(context.Context, time.Duration) error { return c.move("lock", Running, Locked) }
func (c *fakeCtx) Checkpoint(context.Context) error {
	return c.move("checkpoint", Locked, Checkpointed)
}
func (c *fakeCtx) Unlock(context.Context) error { return c.move("unlock", Locked, Running) }
func (c *fakeCtx) Restore(_ context.Context, m DeviceMap) error {
	c.mu.Lock()
	c.restored = m
	c.mu.Unlock()
	return c.move("restore", Checkpointed, Locked)
}

func (c *fakeCtx) setFail(action string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fail == nil {
		c.fail = map[string]error{}
	}
	c.fail[action] = err
}

// fakeDriver holds fake contexts by PID.
type fakeDriver struct {
	ctxs map[int]*fakeCtx
}

func (d *fakeDriver) Kind() string { return "fake" }

func (d *fakeDriver) Discover(_ context.Context, pids []int) ([]Context, error) {
	var out []Context
	for _, p := range pids {
		if c, ok := d.ctxs[p]; ok {
			out = append(out, c)
		}
	}
	return out, nil
}

func (d *fakeDriver) Attach(rec Record) (Context, error) {
	if c, ok := d.ctxs[rec.PID]; ok {
		return c, nil
	}
	return nil, fmt.Errorf("pid %d: %w", rec.PID, ErrNoContext)
}

func (d *fakeDriver) Inventory(context.Context) (Inventory, error) { return Inventory{}, nil }

// world is a job of n sleeping processes, each holding a fake context.
type world struct {
	reg  *Registry
	drv  *fakeDriver
	log  *callLog
	job  JobRef
	ctxs []*fakeCtx
	dir  string
}

func newWorld(t *testing.T, n int) *world {
	t.Helper()
	w := &world{drv: &fakeDriver{ctxs: map[int]*fakeCtx{}}, log: &callLog{}, dir: filepath.Join(t.TempDir(), "journal")}
	w.reg = NewRegistry(w.drv)
	for i := 0; i < n; i++ {
		cmd := exec.Command("sleep", "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		pid := cmd.Process.Pid
		c := &fakeCtx{rec: Record{Kind: "fake", PID: pid, Devices: []Device{{UUID: fmt.Sprintf("GPU-%d", i)}}}, log: w.log}
		w.drv.ctxs[pid] = c
		w.ctxs = append(w.ctxs, c)
		st, _ := proc.ReadStat(pid)
		w.job.Procs = append(w.job.Procs, ProcRef{PID: pid, StartTime: st.StartTime})
	}
	w.job.RootPID = w.job.Procs[0].PID
	return w
}

func (w *world) quiesce() (*Group, error) {
	return Quiesce(context.Background(), QuiesceOptions{Registry: w.reg, Job: w.job, LockTimeout: time.Second, JournalDir: w.dir})
}

func (w *world) states(t *testing.T, want State) {
	t.Helper()
	for _, c := range w.ctxs {
		if st, _ := c.State(context.Background()); st != want {
			t.Errorf("pid %d is %v, want %v", c.rec.PID, st, want)
		}
	}
}

func (w *world) journals(t *testing.T) []string {
	t.Helper()
	fs, err := journalFiles(w.dir)
	if err != nil {
		t.Fatal(err)
	}
	return fs
}

func TestQuiesceLocksAllThenCheckpointsAll(t *testing.T) {
	w := newWorld(t, 3)
	g, err := w.quiesce()
	if err != nil {
		t.Fatal(err)
	}
	w.states(t, Checkpointed)
	calls := w.log.list()
	if len(calls) != 6 {
		t.Fatalf("calls %v", calls)
	}
	for i, c := range calls {
		if want := map[bool]string{true: "lock", false: "checkpoint"}[i < 3]; !strings.HasPrefix(c, want) {
			t.Errorf("call %d is %q: every lock must come before any checkpoint (%v)", i, c, calls)
		}
	}
	if len(w.journals(t)) != 1 {
		t.Error("no journal while the contexts are checkpointed")
	}
	for _, r := range g.Records() {
		if r.Initial != Running || r.StartTime == 0 {
			t.Errorf("record %+v", r)
		}
	}
	if err := g.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.states(t, Running)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if fs := w.journals(t); len(fs) != 0 {
		t.Errorf("journal left after a clean operation: %v", fs)
	}
}

func TestQuiesceLockFailureUndoes(t *testing.T) {
	w := newWorld(t, 3)
	w.ctxs[1].setFail("lock", fmt.Errorf("CUDA_ERROR_TIMEOUT: %w", ErrLockTimeout))
	_, err := w.quiesce()
	var pe *PhaseError
	if !errors.As(err, &pe) || pe.Phase != "lock" || pe.PID != w.ctxs[1].rec.PID || !errors.Is(err, ErrLockTimeout) {
		t.Fatalf("err = %v, want a lock PhaseError for pid %d matching ErrLockTimeout", err, w.ctxs[1].rec.PID)
	}
	w.states(t, Running)
	for _, c := range w.log.list() {
		if strings.HasPrefix(c, "checkpoint") {
			t.Errorf("checkpointed after a failed lock: %v", w.log.list())
		}
	}
	if fs := w.journals(t); len(fs) != 0 {
		t.Errorf("journal left after a clean undo: %v", fs)
	}
}

func TestQuiesceCheckpointFailureUndoes(t *testing.T) {
	w := newWorld(t, 3)
	w.ctxs[2].setFail("checkpoint", errors.New("CUDA_ERROR_OUT_OF_MEMORY"))
	_, err := w.quiesce()
	var pe *PhaseError
	if !errors.As(err, &pe) || pe.Phase != "checkpoint" || pe.PID != w.ctxs[2].rec.PID {
		t.Fatalf("err = %v, want a checkpoint PhaseError", err)
	}
	if !strings.Contains(err.Error(), "offload checkpoint of the fake context of pid") {
		t.Errorf("message %q does not name the phase and pid", err)
	}
	w.states(t, Running)
	// Undo is in reverse: the checkpointed ones were restored before unlock.
	calls := w.log.list()
	last := map[int]string{}
	for _, c := range calls {
		var a string
		var p int
		fmt.Sscanf(c, "%s %d", &a, &p)
		if a == "unlock" && last[p] == "checkpoint" {
			t.Errorf("pid %d unlocked while checkpointed: %v", p, calls)
		}
		last[p] = a
	}
}

func TestQuiesceKeepsJournalWhenUndoFails(t *testing.T) {
	w := newWorld(t, 2)
	w.ctxs[0].setFail("checkpoint", errors.New("boom"))
	w.ctxs[1].setFail("unlock", errors.New("driver wedged"))
	_, err := w.quiesce()
	if err == nil || !strings.Contains(err.Error(), "cryo recover") || !strings.Contains(err.Error(), "driver wedged") {
		t.Fatalf("err = %v, want the failure, the undo failure and a hint to run cryo recover", err)
	}
	if st, _ := w.ctxs[1].State(context.Background()); st != Locked {
		t.Fatalf("pid %d is %v, want still locked", w.ctxs[1].rec.PID, st)
	}
	if len(w.journals(t)) != 1 {
		t.Fatal("journal not kept for recovery")
	}
	// The wedge clears; recovery finishes the job.
	w.ctxs[1].setFail("unlock", nil)
	rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
	if err != nil {
		t.Fatal(err)
	}
	w.states(t, Running)
	if len(rs) != 1 || !rs[0].Done || rs[0].Op != "checkpoint" {
		t.Errorf("recovered %+v", rs)
	}
	if fs := w.journals(t); len(fs) != 0 {
		t.Errorf("journal left after recovery: %v", fs)
	}
}

func TestQuiesceLeavesForeignLocksAlone(t *testing.T) {
	w := newWorld(t, 2)
	w.ctxs[1].st = Locked // someone else locked it before cryo came
	g, err := w.quiesce()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	g.Close()
	if st, _ := w.ctxs[1].State(context.Background()); st != Locked {
		t.Errorf("a context locked by someone else ended %v, want locked as found", st)
	}
	if st, _ := w.ctxs[0].State(context.Background()); st != Running {
		t.Errorf("pid %d ended %v", w.ctxs[0].rec.PID, st)
	}
	for _, c := range w.log.list() {
		if c == fmt.Sprintf("lock %d", w.ctxs[1].rec.PID) {
			t.Error("locked an already locked context")
		}
	}
}

func TestQuiesceWithoutContextsWritesNothing(t *testing.T) {
	w := newWorld(t, 1)
	w.drv.ctxs = map[int]*fakeCtx{}
	g, err := w.quiesce()
	if err != nil || g.Len() != 0 {
		t.Fatalf("%v, %v", g, err)
	}
	if err := g.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(w.dir); !os.IsNotExist(err) {
		t.Errorf("journal directory created for a job without offload contexts: %v", err)
	}
}

// A cryo killed half-way: its journal is left, unlocked. The next Recover
// brings every context back, whatever state it was left in.
func TestRecoverAfterKilledCryo(t *testing.T) {
	w := newWorld(t, 3)
	g, err := w.quiesce()
	if err != nil {
		t.Fatal(err)
	}
	w.ctxs[1].st = Locked // killed between restore and unlock, say
	// "Kill" the cryo: its journal stays, its flock goes.
	if err := g.j.Abandon(); err != nil {
		t.Fatal(err)
	}
	rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
	if err != nil {
		t.Fatal(err)
	}
	w.states(t, Running)
	if len(rs) != 1 || len(rs[0].Contexts) != 3 || rs[0].Contexts[1].From != Locked || rs[0].Contexts[0].From != Checkpointed || rs[0].Contexts[0].To != Running {
		t.Errorf("recovered %+v", rs)
	}
	if fs := w.journals(t); len(fs) != 0 {
		t.Errorf("journal left: %v", fs)
	}
}

func TestRecoverLeavesLiveCryoAlone(t *testing.T) {
	w := newWorld(t, 1)
	g, err := w.quiesce()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
	if err != nil || len(rs) != 0 {
		t.Fatalf("recover with a live writer: %v, %v", rs, err)
	}
	w.states(t, Checkpointed)
}

func TestRecoverTornJournalAndGoneProcesses(t *testing.T) {
	w := newWorld(t, 2)
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	w.ctxs[0].st = Checkpointed
	live := w.ctxs[0].rec
	live.StartTime = w.job.Procs[0].StartTime
	reused := w.ctxs[1].rec
	reused.StartTime = w.job.Procs[1].StartTime + 1 // the PID now names another process
	w.ctxs[1].st = Locked
	var b strings.Builder
	fmt.Fprintf(&b, `{"v":1,"event":"begin","op":"checkpoint","job":{"root_pid":%d}}`+"\n", live.PID)
	for _, r := range []Record{live, reused} {
		fmt.Fprintf(&b, `{"v":1,"event":"context","context":{"kind":"fake","pid":%d,"start_time":%d,"initial":"running"}}`+"\n", r.PID, r.StartTime)
	}
	b.WriteString(`{"v":1,"event":"intent","kind":"fake","pid":1,"act`) // torn by a kill
	if err := os.WriteFile(filepath.Join(w.dir, "checkpoint-1-1.jsonl"), []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := w.ctxs[0].State(context.Background()); st != Running {
		t.Errorf("live context %v, want running", st)
	}
	if st, _ := w.ctxs[1].State(context.Background()); st != Locked {
		t.Errorf("a reused PID's context was touched: %v", st)
	}
	if len(rs) != 1 || !rs[0].Contexts[1].Gone || rs[0].Contexts[0].Gone {
		t.Errorf("recovered %+v", rs)
	}
}

func TestRecoverContinuesAStoppedJob(t *testing.T) {
	w := newWorld(t, 1)
	g, err := w.quiesce()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.NoteStopped(); err != nil {
		t.Fatal(err)
	}
	pid := w.job.Procs[0].PID
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitState(t, pid, 'T')
	g.j.Abandon()
	rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || len(rs[0].Continued) != 1 || rs[0].Continued[0] != pid {
		t.Errorf("recovered %+v, want pid %d continued", rs, pid)
	}
	waitState(t, pid, 'S')
	w.states(t, Running)
}

func TestAttachRestoresWithTheDeviceMap(t *testing.T) {
	w := newWorld(t, 2)
	for _, c := range w.ctxs {
		c.st = Checkpointed // as CRIU restores them
	}
	m := DeviceMap{"GPU-0": "GPU-7", "GPU-1": "GPU-1"}
	var recs []Record
	for _, c := range w.ctxs {
		recs = append(recs, c.rec)
	}
	g, err := Attach(context.Background(), AttachOptions{Registry: w.reg, Records: recs, Map: m, Job: w.job, JournalDir: w.dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Refresh(); err != nil {
		t.Fatal(err)
	}
	for _, r := range g.Records() {
		if r.StartTime == 0 {
			t.Errorf("no start time after Refresh: %+v", r)
		}
	}
	if err := g.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	w.states(t, Running)
	if w.ctxs[0].restored.String() != m.String() {
		t.Errorf("restored with %v, want %v", w.ctxs[0].restored, m)
	}
	if fs := w.journals(t); len(fs) != 0 {
		t.Errorf("journal left: %v", fs)
	}
}

func waitState(t *testing.T, pid int, want byte) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if st, err := proc.ReadStat(pid); err == nil && st.State == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	st, _ := proc.ReadStat(pid)
	t.Fatalf("pid %d is in state %c, want %c", pid, st.State, want)
}

// A job restored in fresh PID namespaces: its contexts' recorded PIDs are
// those it had on the node before, which now name other processes (here
// one of another job, locked mid-checkpoint). A cryo killed before or after
// it rebound the contexts to the restored processes leaves a journal whose
// recovery brings those back and never touches the holders of the old PIDs.
func TestRebindNeverJournalsTheOldPIDs(t *testing.T) {
	for _, killed := range []string{"before rebind", "after rebind"} {
		t.Run(killed, func(t *testing.T) {
			w := newWorld(t, 2)
			other, restored := w.ctxs[0], w.ctxs[1]
			other.st = Locked          // another job's, mid-checkpoint
			restored.st = Checkpointed // as CRIU restores it
			rec := other.rec           // recorded under the PID it had then
			rec.JobPID = 7
			g, err := Attach(context.Background(), AttachOptions{Registry: w.reg, Records: []Record{rec}, Job: JobRef{RootPID: rec.PID},
				JournalDir: w.dir, Rebind: true})
			if err != nil {
				t.Fatal(err)
			}
			if killed == "after rebind" {
				err := g.Rebind(func(r Record) (int, error) {
					if r.JobPID != 7 {
						t.Errorf("rebinding %+v, want job pid 7", r)
					}
					return restored.rec.PID, nil
				})
				if err != nil {
					t.Fatal(err)
				}
				if err := g.Refresh(); err != nil {
					t.Fatal(err)
				}
			}
			g.j.Abandon()
			rs, err := Recover(context.Background(), RecoverOptions{Registry: w.reg, JournalDir: w.dir})
			if err != nil {
				t.Fatal(err)
			}
			if st, _ := other.State(context.Background()); st != Locked {
				t.Errorf("the process that holds the old PID now was touched: %v", st)
			}
			for _, r := range rs {
				for _, c := range r.Contexts {
					if c.PID == other.rec.PID {
						t.Errorf("recovered a context by its old PID: %+v", c)
					}
				}
			}
			want := Checkpointed // nothing knew where it was
			if killed == "after rebind" {
				want = Running
			}
			if st, _ := restored.State(context.Background()); st != want {
				t.Errorf("the restored process's context is %v, want %v", st, want)
			}
		})
	}
}

// Rebind fails, naming the context, where a restored process is not found:
// the contexts must not stay bound to PIDs that name other processes.
func TestRebindFailsWithoutTheProcess(t *testing.T) {
	w := newWorld(t, 1)
	rec := w.ctxs[0].rec
	rec.JobPID = 9
	g, err := Attach(context.Background(), AttachOptions{Registry: w.reg, Records: []Record{rec}, Job: JobRef{RootPID: rec.PID},
		JournalDir: w.dir, Rebind: true})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	lost := errors.New("not among the restored processes")
	if err := g.Rebind(func(Record) (int, error) { return 0, lost }); !errors.Is(err, lost) || !strings.Contains(err.Error(), fmt.Sprint(rec.PID)) {
		t.Errorf("Rebind = %v, want the lookup's error naming the context", err)
	}
	if err := g.Refresh(); err == nil {
		t.Error("Refresh of contexts that were never rebound succeeded")
	}
	if err := g.Resume(context.Background()); err == nil {
		t.Error("Resume of contexts that were never rebound succeeded")
	}
}
