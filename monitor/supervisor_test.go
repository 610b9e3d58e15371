package monitor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/restore"
)

// fakeEngine is a store of generations in memory and a job that is not
// there: the supervisor's decisions are checked against it without CRIU.
type fakeEngine struct {
	gens       []Generation
	dump       []store.Process // what a checkpoint finds in the job
	restoreErr func(gen int) error
	restores   []int
	removed    []int
	terminated int
	starts     int
}

func (f *fakeEngine) Start(context.Context, string) (int, error) {
	f.starts++
	return 1000 + f.starts, nil
}

func (f *fakeEngine) Checkpoint(_ context.Context, pid int, kill bool, accept func(checkpoint.Dumped) error) (*checkpoint.Result, error) {
	if err := accept(checkpoint.Dumped{RootPID: pid, Processes: f.dump}); err != nil {
		return nil, fmt.Errorf("%w: %w", checkpoint.ErrRefused, err) // as checkpoint.Take does
	}
	n := 1
	if len(f.gens) > 0 {
		n = f.gens[len(f.gens)-1].N + 1
	}
	f.gens = append(f.gens, Generation{N: n, Began: time.Now()})
	return &checkpoint.Result{Generation: n, Killed: kill}, nil
}

func (f *fakeEngine) Restore(_ context.Context, gen int) (*Restored, error) {
	f.restores = append(f.restores, gen)
	if f.restoreErr != nil {
		if err := f.restoreErr(gen); err != nil {
			return nil, err
		}
	}
	return &Restored{PID: 2000 + gen, Took: 412345 * time.Microsecond}, nil
}

func (f *fakeEngine) Terminate(JobProcs) error { f.terminated++; return nil }

func (f *fakeEngine) Generations() ([]Generation, error) { return slices.Clone(f.gens), nil }

func (f *fakeEngine) Remove(gens []int) error {
	f.removed = append(f.removed, gens...)
	f.gens = slices.DeleteFunc(f.gens, func(g Generation) bool { return slices.Contains(gens, g.N) })
	return nil
}

func (f *fakeEngine) numbers() []int {
	var out []int
	for _, g := range f.gens {
		out = append(out, g.N)
	}
	return out
}

// newTestSupervisor is a supervisor of a running two-tree job (job-init
// 100, host 101, offload-1 102) on the fake engine, recording its events.
func newTestSupervisor(t *testing.T, eng *fakeEngine, cfg Config) (*Supervisor, *[]Event) {
	t.Helper()
	cfg.Store = t.TempDir()
	cfg.Trees = []TreeSpec{{Name: "host", Argv: []string{"host"}, Host: true}, {Name: "offload-1", Argv: []string{"w"}}}
	cfg.Engine = eng
	if cfg.Backoff == 0 {
		cfg.Backoff = time.Millisecond
	}
	var events []Event
	cfg.OnEvent = func(e Event) { events = append(events, e) }
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(RunDir(cfg.Store), 0o700); err != nil {
		t.Fatal(err)
	}
	s.initPID = 100
	s.afterStart()
	s.roots = map[int]string{101: "host", 102: "offload-1"}
	eng.dump = []store.Process{{PID: 100}, {PID: 101, PPID: 100}, {PID: 102, PPID: 100}}
	return s, &events
}

func kinds(events []Event) string {
	var ks []string
	for _, e := range events {
		ks = append(ks, e.Kind)
	}
	return strings.Join(ks, " ")
}

func eventsText(events []Event) string {
	var b strings.Builder
	for _, e := range events {
		fmt.Fprintf(&b, "%s: %s\n", e.Kind, e.Detail)
	}
	return b.String()
}

// Issue 13's first loss: a generation that lacks a tree used to be
// committed (retention evicting a good one) and only then discarded; with
// --keep 1 the store could end up empty. It is refused before the commit
// now: never stored, never counted.
func TestRefusedCheckpointIsNeverCommitted(t *testing.T) {
	eng := &fakeEngine{}
	s, events := newTestSupervisor(t, eng, Config{Keep: 1, MaxRestarts: 3})
	ctx := context.Background()
	if _, err := s.checkpoint(ctx, false); err != nil {
		t.Fatal(err)
	}
	// The offload tree ends while the job is dumped.
	eng.dump = eng.dump[:2]
	_, err := s.checkpoint(ctx, false)
	if !errors.Is(err, checkpoint.ErrRefused) || !strings.Contains(err.Error(), "tree offload-1 (pid 102)") {
		t.Fatalf("checkpoint of a job without its offload tree: %v, want it refused naming the tree", err)
	}
	if got := eng.numbers(); !slices.Equal(got, []int{1}) || len(eng.removed) != 0 {
		t.Fatalf("store holds %v (removed %v), want generation 1 alone, untouched", got, eng.removed)
	}
	if s.pending.kind != kindTree {
		t.Errorf("the refusal is not taken for a failure: pending %+v", s.pending)
	}
	// The failure is handled from generation 1, which is still there.
	code, done, err := s.fail(ctx, s.detect())
	if done || err != nil {
		t.Fatalf("fail: code %d, done %v, %v\n%s", code, done, err, eventsText(*events))
	}
	if !slices.Equal(eng.restores, []int{1}) {
		t.Errorf("restored %v, want generation 1", eng.restores)
	}
	if !strings.Contains(kinds(*events), "checkpoint checkpoint-failed failure restored") {
		t.Errorf("events: %s", kinds(*events))
	}
	// What was restored, as what, and how long it took.
	if want := "restored: generation 1, job-init pid 2001, in 412ms\n"; !strings.Contains(eventsText(*events), want) {
		t.Errorf("events say:\n%swant %q", eventsText(*events), want)
	}
}

// Issue 13's second loss, through the supervisor: generations taken after
// the failure's onset are skipped, reported once, and stay in the store;
// the newest one from before is restored.
func TestFailureSkipsGenerationsAfterItsOnset(t *testing.T) {
	eng := &fakeEngine{}
	s, events := newTestSupervisor(t, eng, Config{Keep: 3, MaxRestarts: 3})
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if _, err := s.checkpoint(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	onset := time.Now()
	time.Sleep(2 * time.Millisecond)
	for i := 0; i < 2; i++ {
		if _, err := s.checkpoint(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, done, err := s.fail(ctx, failure{kind: kindHang, tree: "offload-1", detail: "no progress", onset: onset}); done || err != nil {
		t.Fatalf("fail: %v %v", done, err)
	}
	if !slices.Equal(eng.restores, []int{2}) {
		t.Errorf("restored %v, want generation 2, the newest from before the onset", eng.restores)
	}
	// (Retention had removed 1 at the fourth checkpoint.)
	if got := eng.numbers(); !slices.Equal(got, []int{2, 3, 4}) {
		t.Errorf("store holds %v, want 2, 3, 4: skipped, not deleted", got)
	}
	// The next checkpoint's retention keeps them too: 3 and 4 are not
	// counted, and are newer than 2.
	if _, err := s.checkpoint(ctx, false); err != nil {
		t.Fatal(err)
	}
	if got := eng.numbers(); !slices.Equal(got, []int{2, 3, 4, 5}) {
		t.Errorf("after the next checkpoint the store holds %v, want 2, 3, 4, 5", got)
	}
	text := eventsText(*events)
	if strings.Count(text, "skipped: generation 4") != 1 || strings.Count(text, "skipped: generation 3") != 1 {
		t.Errorf("each skipped generation is to be reported once:\n%s", text)
	}
	// They are never restored later either, and a later run knows it.
	if rs := s.readRunState(); rs == nil || rs.PassedOver[3] == "" || rs.PassedOver[4] == "" {
		t.Errorf("run state does not name 3 and 4 as passed over: %+v", rs)
	}
}

// A restore failure that recurs is tried once per generation, reported in
// one line each, and then supervision gives up (the last one only in the
// error): no backoff loop, no second copy, no CRIU excerpt.
func TestRecurringRestoreFailureIsTriedOnce(t *testing.T) {
	eng := &fakeEngine{}
	s, events := newTestSupervisor(t, eng, Config{Keep: 3, MaxRestarts: 5})
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if _, err := s.checkpoint(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	eng.restoreErr = func(gen int) error {
		log := fmt.Sprintf("%s/restore-%d.log", dir, gen)
		writeLog(t, log, "(00.1) Error (criu/files-reg.c:2156): Can't open file tmp/ompi/hwloc.sm on restore: No such file or directory\n"+
			"(00.2) Error (criu/cr-restore.c:2600): Restoring FAILED.\n")
		return fmt.Errorf("restore generation %d: %w", gen, &criu.Error{Err: errors.New("criu failed"), Log: log})
	}
	code, done, err := s.fail(ctx, failure{kind: kindCrash, tree: "host", code: 139, detail: "host tree was killed by SIGSEGV", onset: time.Now()})
	if !done || code != 1 || !errors.Is(err, ErrGaveUp) {
		t.Fatalf("fail: code %d, done %v, %v; want a give-up with exit 1", code, done, err)
	}
	if !slices.Equal(eng.restores, []int{2, 1}) {
		t.Errorf("restores %v, want 2 then 1, once each", eng.restores)
	}
	if s.pol.restarts != 1 {
		t.Errorf("%d attempts, want 1", s.pol.restarts)
	}
	// cryo run prints every event but the give-up, which is its error.
	text := eventsText(slices.DeleteFunc(slices.Clone(*events), func(e Event) bool { return e.Kind == "gave-up" }))
	if n := strings.Count(text, "Can't open file"); n != 1 {
		t.Errorf("the CRIU line is reported %d times in the events, want once (generation 2):\n%s", n, text)
	}
	if strings.Count(err.Error(), "Can't open file") != 1 || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "restore-1.log") {
		t.Errorf("the error is to be one line with the one CRIU line and the log: %q", err)
	}
}

// A PID of the job held by a live process outside it: give up at once,
// without trying older generations (they need the same PIDs) and without
// touching the holder (the engine is never asked to end anything more).
func TestLiveHolderOfAPIDStops(t *testing.T) {
	eng := &fakeEngine{}
	s, _ := newTestSupervisor(t, eng, Config{Keep: 3, MaxRestarts: 5})
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		s.checkpoint(ctx, false)
	}
	eng.restoreErr = func(int) error {
		return &restore.PIDError{ID: 101, Comm: "host", Holder: proc.Holder{ID: 101, PID: 101, Comm: "sleep", How: "pid"}, Live: true}
	}
	terminated := eng.terminated
	_, done, err := s.fail(ctx, failure{kind: kindCrash, detail: "x", onset: time.Now()})
	if !done || !errors.Is(err, ErrGaveUp) || !errors.Is(err, restore.ErrPIDInUse) && !strings.Contains(err.Error(), "sleep") {
		t.Fatalf("fail: %v %v", done, err)
	}
	if !slices.Equal(eng.restores, []int{2}) {
		t.Errorf("restores %v, want generation 2 alone", eng.restores)
	}
	// One Terminate for the failure, one for what the failed restore may
	// have left (our own children only).
	if eng.terminated-terminated != 2 {
		t.Errorf("Terminate called %d times", eng.terminated-terminated)
	}
}

// A restore that fails in a way that may pass is retried after the
// backoff, counted against --max-restarts.
func TestTransientRestoreFailureIsRetried(t *testing.T) {
	eng := &fakeEngine{}
	s, events := newTestSupervisor(t, eng, Config{Keep: 3, MaxRestarts: 5})
	ctx := context.Background()
	s.checkpoint(ctx, false)
	s.checkpoint(ctx, false)
	fails := 1
	eng.restoreErr = func(int) error {
		if fails > 0 {
			fails--
			return errors.New("criu was killed")
		}
		return nil
	}
	if _, done, err := s.fail(ctx, failure{kind: kindChannel, detail: "x", onset: time.Now()}); done || err != nil {
		t.Fatalf("fail: %v %v", done, err)
	}
	if !slices.Equal(eng.restores, []int{2, 2}) || s.pol.restarts != 2 {
		t.Errorf("restores %v after %d attempts, want 2 twice in 2 attempts\n%s", eng.restores, s.pol.restarts, eventsText(*events))
	}
}

// --max-restarts bounds the attempts.
func TestGivesUpAfterMaxRestarts(t *testing.T) {
	eng := &fakeEngine{}
	s, _ := newTestSupervisor(t, eng, Config{Keep: 3, MaxRestarts: 2})
	ctx := context.Background()
	f := failure{kind: kindTree, tree: "offload-1", code: 137, detail: "offload tree offload-1 (pid 102) was killed by SIGKILL"}
	for i := 0; i < 2; i++ {
		f.onset = time.Now()
		if _, done, err := s.fail(ctx, f); done || err != nil {
			t.Fatalf("failure %d: %v %v", i+1, done, err)
		}
	}
	f.onset = time.Now()
	_, done, err := s.fail(ctx, f)
	if !done || !errors.Is(err, ErrGaveUp) || !strings.Contains(err.Error(), "after 2 restarts") {
		t.Errorf("third failure: %v %v, want a give-up after 2 restarts", done, err)
	}
	if eng.starts != 2 {
		t.Errorf("%d fresh starts, want 2 (there was no checkpoint)", eng.starts)
	}
}
