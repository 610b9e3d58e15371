package monitor

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/restore"
)

var t0 = time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC)

func at(min int) time.Time { return t0.Add(time.Duration(min) * time.Minute) }

// gensEvery is generations 1..n, one begun every minute.
func gensEvery(n int) []Generation {
	var out []Generation
	for i := 1; i <= n; i++ {
		out = append(out, Generation{N: i, Began: at(i)})
	}
	return out
}

func testPolicy() policy {
	return newPolicy(Config{MaxRestarts: 3, Backoff: time.Second, RepeatWindow: time.Minute})
}

func TestJudgeEnd(t *testing.T) {
	now := at(10)
	host := func(code int, sig string) *treeEnd {
		return &treeEnd{tree: "host", pid: 7, code: code, signal: sig, at: at(9)}
	}
	offload := failure{kind: kindTree, tree: "offload-1", code: 137, detail: "offload tree offload-1 (pid 8) was killed by SIGKILL", onset: at(8)}
	cases := []struct {
		name          string
		host          *treeEnd
		pending       failure
		restartOnExit bool
		wantDone      bool
		wantCode      int
		wantKind      string
	}{
		{name: "success", host: host(0, ""), wantDone: true},
		{name: "success though an offload tree failed", host: host(0, ""), pending: offload, wantDone: true},
		{name: "a plain exit code is the job's answer", host: host(3, ""), wantDone: true, wantCode: 3},
		{name: "with --restart-on-exit it is a failure", host: host(3, ""), restartOnExit: true, wantKind: kindExit},
		{name: "a signal is a crash", host: host(139, "SIGSEGV"), wantKind: kindCrash},
		{name: "a launcher reporting a rank killed by SIGKILL is a crash", host: host(137, ""), wantKind: kindCrash},
		{name: "so is one reporting SIGSEGV, with --restart-on-exit too", host: host(139, ""), restartOnExit: true, wantKind: kindCrash},
		{name: "128 itself is a plain code", host: host(128, ""), wantDone: true, wantCode: 128},
		{name: "above 128+64 is a plain code", host: host(255, ""), wantDone: true, wantCode: 255},
		{name: "an offload tree that died first is the failure", host: host(4, ""), pending: offload, wantKind: kindTree},
		{name: "job-init gone without the host's end", wantKind: kindCrash},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, code, done := judgeEnd("job-init (pid 5) was killed by SIGKILL", tc.host, tc.pending, tc.restartOnExit, now)
			if done != tc.wantDone || code != tc.wantCode || f.kind != tc.wantKind {
				t.Errorf("judgeEnd = %+v, code %d, done %v; want kind %q, code %d, done %v", f, code, done, tc.wantKind, tc.wantCode, tc.wantDone)
			}
			if !done && f.onset.IsZero() {
				t.Errorf("a failure without an onset: %+v", f)
			}
		})
	}
	// The offload tree's failure keeps its own onset: the host's exit
	// came after it.
	if f, _, _ := judgeEnd("", host(4, ""), offload, false, now); !f.onset.Equal(at(8)) {
		t.Errorf("onset %v, want the offload tree's %v", f.onset, at(8))
	}
}

// Issue 13's second loss: a heartbeat timeout of 10 min, checkpoints every
// minute, keep 3. The generations taken after the last beat are skipped,
// not deleted; retention had kept one from before the last beat, which is
// restored, instead of starting the job over.
func TestGenerationsAfterTheOnsetAreSkippedNotDeleted(t *testing.T) {
	p := testPolicy()
	lastBeat := at(2).Add(30 * time.Second) // beats stop after generation 2 began
	var gens []Generation
	// The job checkpoints every minute until the heartbeat is half-way
	// late (unwell), retention running after each.
	for i := 1; i <= 7; i++ {
		gens = append(gens, Generation{N: i, Began: at(i)})
		rm := retain(gens, 3, p.passed, lastBeat)
		gens = slices.DeleteFunc(gens, func(g Generation) bool { return slices.Contains(rm, g.N) })
	}
	var kept []int
	for _, g := range gens {
		kept = append(kept, g.N)
	}
	if !slices.Equal(kept, []int{2, 5, 6, 7}) {
		t.Fatalf("retention kept %v, want the newest 3 and generation 2, the newest from before the last beat", kept)
	}
	p.failed(failure{kind: kindBeat, detail: "no heartbeat for 10m", onset: lastBeat})
	c := p.choose(gens)
	if c.gen != 2 || c.fresh || c.giveUp {
		t.Fatalf("choose = %+v, want generation 2", c)
	}
	if !slices.Equal(c.after, []int{7, 6, 5}) {
		t.Errorf("passed over %v, want 7, 6, 5 (taken after the last beat)", c.after)
	}
	// Skipped, not deleted: after the restore from 2, the next checkpoint's
	// retention keeps them (newer than the oldest kept).
	p.restored(2, at(13))
	gens = append(gens, Generation{N: 8, Began: at(14)})
	if rm := retain(gens, 3, p.passed, at(14)); len(rm) != 0 {
		t.Errorf("retention after the restore removes %v, want nothing", rm)
	}
}

// With every generation after the onset, the job starts over, and the
// generations stay.
func TestAllAfterOnsetStartsOverKeepingThem(t *testing.T) {
	p := testPolicy()
	p.failed(failure{kind: kindHang, onset: at(0)})
	c := p.choose(gensEvery(3))
	if !c.fresh || c.gen != 0 || len(c.after) != 3 || !strings.Contains(c.why, "before the failure") {
		t.Errorf("choose = %+v, want a fresh start passing over 3, 2, 1", c)
	}
	if c := (&policy{passed: map[int]pass{}}).choose(nil); !c.fresh || c.why != "no checkpoint yet" {
		t.Errorf("no generations: %+v", c)
	}
}

// Issue 13's first loss, at the policy level: a refused generation is
// never committed, so retention never counts it; with keep 1 the store
// always holds a generation. (The supervisor half is in
// TestRefusedCheckpointIsNeverCommitted.)
func TestRetainKeepsOne(t *testing.T) {
	gens := gensEvery(4)
	rm := retain(gens, 1, map[int]pass{}, time.Time{})
	if !slices.Equal(rm, []int{1, 2, 3}) {
		t.Errorf("keep 1 removes %v, want 1, 2, 3", rm)
	}
	// A generation passed over is not counted: the newest restorable one
	// stays too.
	rm = retain(gens, 1, map[int]pass{4: {why: "x", fault: true}}, time.Time{})
	if !slices.Equal(rm, []int{1, 2}) {
		t.Errorf("keep 1 with 4 passed over removes %v, want 1, 2 (3 kept, 4 newer than it)", rm)
	}
	if rm := retain(gens, 0, nil, time.Time{}); rm != nil {
		t.Errorf("keep 0 removes %v", rm)
	}
}

// When the job fails the same way right after a restore, the generation
// it came from is passed over for an older one; a different failure, a
// checkpoint meanwhile, or a failure long after do not count.
func TestRepeatFailurePassesOverTheGeneration(t *testing.T) {
	lost := failure{kind: kindTree, tree: "offload-1", code: 137, onset: at(5)}
	for _, tc := range []struct {
		name  string
		again failure
		ckpt  bool
		want  int
	}{
		{name: "same failure right after", again: failure{kind: kindTree, tree: "offload-1", code: 137, onset: at(6).Add(10 * time.Second)}, want: 2},
		{name: "another failure", again: failure{kind: kindHang, tree: "offload-1", onset: at(6).Add(10 * time.Second)}, want: 3},
		{name: "after a checkpoint", again: failure{kind: kindTree, tree: "offload-1", code: 137, onset: at(6).Add(10 * time.Second)}, ckpt: true, want: 3},
		{name: "long after", again: failure{kind: kindTree, tree: "offload-1", code: 137, onset: at(9)}, want: 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := testPolicy()
			p.failed(lost)
			gens := gensEvery(3)
			if c := p.choose(gens); c.gen != 3 {
				t.Fatalf("first choice %+v", c)
			}
			p.restored(3, at(6))
			if tc.ckpt {
				p.checkpointed()
			}
			p.failed(tc.again)
			if c := p.choose(gens); c.gen != tc.want {
				t.Errorf("after the second failure: choose %+v, want generation %d", c, tc.want)
			}
		})
	}
	// A generation passed over for the fault is remembered across runs.
	p := testPolicy()
	p.failed(lost)
	p.restored(3, at(6))
	p.failed(failure{kind: kindTree, tree: "offload-1", code: 137, onset: at(6).Add(time.Second)})
	if f := p.faulty(); len(f) != 1 || f[3] == "" {
		t.Errorf("faulty() = %v, want generation 3", f)
	}
}

func TestRestoreFailureVerdicts(t *testing.T) {
	dir := t.TempDir()
	recurring := &criu.Error{Err: errors.New("criu RESTORE failed"), Log: dir + "/restore.log"}
	writeLog(t, recurring.Log, "(00.1) Error (criu/files-reg.c:2156): Can't open file tmp/x on restore: No such file or directory\n")
	taken := &restore.PIDError{ID: 42, Comm: "job", Holder: proc.Holder{ID: 42, PID: 42, Comm: "sleep", How: "pid"}, Live: true}
	dyingPID := &restore.PIDError{ID: 42, Comm: "job", Holder: proc.Holder{ID: 42, PID: 42, Comm: "sleep", How: "pid", State: 'Z'}}
	damaged := fmt.Errorf("restore generation 3: %w", &store.CorruptError{})

	p := testPolicy()
	p.failed(failure{kind: kindCrash, onset: at(10)})
	gens := gensEvery(3)
	if v := p.restoreFailed(3, fmt.Errorf("restore generation 3: %w", recurring), at(11)); v != tryOlder {
		t.Errorf("a missing file: %v, want tryOlder", v)
	}
	if c := p.choose(gens); c.gen != 2 {
		t.Errorf("after 3 does not restore: %+v, want 2", c)
	}
	if v := p.restoreFailed(2, damaged, at(11)); v != tryOlder {
		t.Errorf("damage: %v, want tryOlder", v)
	}
	// A dying holder may pass: retry, and after a second time pass over.
	if v := p.restoreFailed(1, dyingPID, at(11)); v != retryLater {
		t.Errorf("a dying holder: %v, want retryLater", v)
	}
	if v := p.restoreFailed(1, dyingPID, at(11)); v != tryOlder {
		t.Errorf("a dying holder twice: %v, want tryOlder", v)
	}
	// Nothing left that restores: give up, do not throw the work away.
	if c := p.choose(gens); !c.giveUp || c.fresh || !strings.Contains(c.why, "tried 3, 2, 1") {
		t.Errorf("all unrestorable: %+v, want a give-up naming them", c)
	}
	// A live process outside the job holds a PID: stop at once.
	q := testPolicy()
	if v := q.restoreFailed(3, fmt.Errorf("restore: %w", taken), at(11)); v != stop {
		t.Errorf("a live holder: %v, want stop", v)
	}
}

// mpirun exits 137 some time after a rank was killed; a checkpoint taken
// meanwhile lacks the rank. When the host reports a failure of a process
// below it, a generation with fewer processes than the one before is
// passed over; for a crash of the host itself, process counts say nothing.
func TestAReportedFailurePassesOverGenerationsThatLackAProcess(t *testing.T) {
	gens := gensEvery(4)
	for i, n := range []int{4, 4, 4, 3} { // generation 4: a rank is gone
		for k := 0; k < n; k++ {
			gens[i].PIDs = append(gens[i].PIDs, 10+k)
		}
	}
	p := testPolicy()
	host := &treeEnd{tree: "host", pid: 7, code: 137, at: at(10)}
	f, _, done := judgeEnd("", host, failure{}, false, at(10))
	if done || !f.reported {
		t.Fatalf("mpirun's 137: %+v, done %v; want a reported crash", f, done)
	}
	p.failed(f)
	if c := p.choose(gens); c.gen != 3 || !strings.Contains(p.passed[4].why, "fewer than the 4") {
		t.Errorf("choose = %+v, passed %v; want 3, and 4 passed over for lacking a process", c, p.passed)
	}
	q := testPolicy()
	q.failed(failure{kind: kindCrash, tree: "host", code: 137, onset: at(10)}) // the host itself was killed
	if c := q.choose(gens); c.gen != 4 {
		t.Errorf("a crash of the host itself: choose = %+v, want the newest, 4", c)
	}
}

// A port the job listens on still in use (its old connections in TCP's
// TIME_WAIT): the same restore is tried again, without counting restarts,
// for up to AddrWait; then the address is another's, and nothing restores
// here now. A new failure starts the wait afresh.
func TestRestoreWaitsForAnAddressInUse(t *testing.T) {
	dir := t.TempDir()
	inUse := &criu.Error{Err: errors.New("criu RESTORE failed"), Log: dir + "/restore.log"}
	writeLog(t, inUse.Log, "(00.1)     1: Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 96): Address already in use\n")
	err := fmt.Errorf("restore generation 3: %w", inUse)
	p := testPolicy()
	p.failed(failure{kind: kindCrash, onset: at(10)})
	t0 := at(11)
	for _, d := range []time.Duration{0, addrRetry, AddrWait - time.Second} {
		if v := p.restoreFailed(3, err, t0.Add(d)); v != waitRetry {
			t.Errorf("address in use for %v: %v, want waitRetry", d, v)
		}
	}
	if p.restarts != 0 || p.tries[3] != 0 {
		t.Errorf("waiting for an address counted restarts %d, tries %d", p.restarts, p.tries[3])
	}
	if v := p.restoreFailed(3, err, t0.Add(AddrWait)); v != stop {
		t.Errorf("address in use for AddrWait: %v, want stop", v)
	}
	p.failed(failure{kind: kindCrash, onset: at(20)})
	if v := p.restoreFailed(3, err, at(21)); v != waitRetry {
		t.Errorf("after a new failure: %v, want waitRetry again", v)
	}
}

func TestAttemptsAndBackoff(t *testing.T) {
	p := newPolicy(Config{MaxRestarts: 7, Backoff: time.Second})
	var waits []time.Duration
	for {
		w, ok := p.attempt()
		if !ok {
			break
		}
		waits = append(waits, w)
	}
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30}
	for i := range want {
		want[i] *= time.Second
	}
	if !slices.Equal(waits, want) {
		t.Errorf("waits %v, want %v", waits, want)
	}
	if p.restarts != 7 {
		t.Errorf("restarts %d, want 7", p.restarts)
	}
}

func writeLog(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}
