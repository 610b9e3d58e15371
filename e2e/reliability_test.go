package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

// cryoKilledAt runs cryo with the store's crash hook set to step and
// requires that cryo died there, by SIGKILL.
func cryoKilledAt(t *testing.T, criu, step string, args ...string) {
	t.Helper()
	cmd := cryoCommand(context.Background(), criu, args...)
	cmd.Env = append(cmd.Env, store.CrashEnv+"="+step)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("cryo %s with %s=%s: want it killed there, got %v\nstdout: %s\nstderr: %s",
			strings.Join(args, " "), store.CrashEnv, step, err, out.String(), errb.String())
	}
}

// committed lists the generations `cryo list` shows, requiring each intact.
func committed(t *testing.T, st string) []int {
	t.Helper()
	r := cryo(t, "", "list", "--store", st, "--json")
	var gens []struct {
		Generation int    `json:"generation"`
		Intact     bool   `json:"intact"`
		Problem    string `json:"problem"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || r.code != 0 {
		t.Fatalf("list --json: %v\n%s", err, r)
	}
	var out []int
	for _, g := range gens {
		if !g.Intact {
			t.Errorf("generation %d is not intact: %s", g.Generation, g.Problem)
		}
		out = append(out, g.Generation)
	}
	return out
}

func verifies(t *testing.T, st, after string) {
	t.Helper()
	if r := cryo(t, "", "verify", "--store", st); r.code != 0 || strings.Contains(r.stdout, "BAD") {
		t.Fatalf("verify after %s: %s", after, r)
	}
}

// TestKilledAtEachPersistStep kills cryo with SIGKILL at each step of
// committing a checkpoint (a pack written but not yet named, every pack
// durable, manifest written just before the rename, renamed), in the
// middle of a garbage collection, and of a repack. After
// each, the job runs on, `cryo verify` accepts the store, `cryo list`
// shows exactly the generations that were committed, the next checkpoint
// works, and in the end every committed generation restores and finishes
// with the result of an uninterrupted run.
func TestKilledAtEachPersistStep(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, true, append(storageArgs, "-delay", "100ms")...)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 3, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	wantGens := []int{1}
	for _, step := range []string{"pack-written", "chunks-written", "manifest-written", "renamed"} {
		cryoKilledAt(t, criu, step, "checkpoint", "--store", st, "--leave-running", pid)
		if j.exited() {
			t.Fatalf("the job ended when cryo was killed at %s", step)
		}
		if step == "renamed" {
			wantGens = append(wantGens, len(wantGens)+1) // the rename is the commit
		}
		verifies(t, st, "a kill at "+step)
		if got := committed(t, st); !slices.Equal(got, wantGens) {
			t.Fatalf("after a kill at %s, list shows generations %v, want %v", step, got, wantGens)
		}
	}
	r := cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid)
	if r.code != 0 {
		t.Fatalf("checkpoint after the kills: %s", r)
	}
	wantGens = append(wantGens, len(wantGens)+1)
	if ents, _ := os.ReadDir(filepath.Join(st, "staging")); len(ents) > 1 { // journal/ stays
		t.Errorf("staging still holds what the killed cryos left: %v", ents)
	}

	// The killed checkpoints left chunks no generation uses: a gc killed
	// after removing one of them harms nothing, and the next gc finishes.
	cryoKilledAt(t, criu, "gc", "gc", "--store", st)
	verifies(t, st, "a kill during gc")
	if r := cryo(t, "", "gc", "--store", st); r.code != 0 {
		t.Fatalf("gc after a killed gc: %s", r)
	}
	verifies(t, st, "gc")
	if got := committed(t, st); !slices.Equal(got, wantGens) {
		t.Fatalf("after gc, list shows generations %v, want %v", got, wantGens)
	}
	// A repack (every generation's packs into new ones) killed once its
	// new packs are durable, and once after it removed one old pack: every
	// generation still verifies, and the next repack finishes.
	for _, step := range []string{"repack-written", "gc"} {
		cryoKilledAt(t, criu, step, "gc", "--repack", "--store", st)
		verifies(t, st, "a kill at "+step+" of a repack")
		if got := committed(t, st); !slices.Equal(got, wantGens) {
			t.Fatalf("after a repack killed at %s, list shows generations %v, want %v", step, got, wantGens)
		}
	}
	if r := cryo(t, "", "gc", "--repack", "--store", st); r.code != 0 {
		t.Fatalf("repack after killed ones: %s", r)
	}
	verifies(t, st, "a repack")

	j.killTree(t)
	for _, g := range wantGens {
		// Each restored run appends to the job's output; start it afresh
		// so that it shows that run alone.
		if err := os.Truncate(out, 0); err != nil {
			t.Fatal(err)
		}
		r := cryo(t, criu, "restore", "--store", st, "--generation", strconv.Itoa(g))
		if r.code != 0 || strings.TrimSpace(r.stdout) != pid {
			t.Fatalf("restore --generation %d: %s", g, r)
		}
		killAtEnd(t, j.pid)
		restoredRuns(t, manifest(t, st, g), out, want)
	}
}

// TestRandomDamageFallback: random damage (bit flip, truncation, deletion)
// to a chunk or a manifest of a store of three generations. Each time a
// plain restore of the newest generation refuses (exit 1, nothing runs),
// and restore --fallback brings back exactly the newest generation that
// does not use the damaged piece, which then finishes with the result of
// an uninterrupted run. (internal/store's TestRandomCorruption does 200
// rounds of this without CRIU.)
func TestRandomDamageFallback(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, true, append(storageArgs, "-delay", "50ms")...)
	pid := strconv.Itoa(j.pid)
	for _, step := range []int{5, 12, 20} {
		waitStep(t, out, step, 30*time.Second)
		if r := cryo(t, criu, "checkpoint", "--store", st, pid); r.code != 0 {
			t.Fatalf("checkpoint: %s", r)
		}
	}
	j.killTree(t)
	ms := []*store.Manifest{manifest(t, st, 1), manifest(t, st, 2), manifest(t, st, 3)}
	// What each pack holds, and which chunks are deltas on which base.
	packs, err := func() ([]store.PackInfo, error) {
		s, err := store.Open(st)
		if err != nil {
			return nil, err
		}
		return s.Packs()
	}()
	if err != nil {
		t.Fatal(err)
	}
	base := map[string]string{}
	for _, p := range packs {
		for _, r := range p.Records {
			if r.Kind == "delta" {
				base[r.Hash] = r.Base
			}
		}
	}
	// A restore needs every chunk of a generation but those of CRIU's log,
	// and the base of every delta.
	uses := func(m *store.Manifest, lost map[string]bool) bool {
		for _, f := range m.Files {
			if f.Kind == "log" {
				continue
			}
			for _, c := range f.Chunks {
				if !c.Zero && (lost[c.Hash] || lost[base[c.Hash]]) {
					return true
				}
			}
		}
		return false
	}
	rng := newRand(20261122)
	for round := range 8 {
		// A piece of generation 2 or 3 (possibly shared with others).
		m := ms[1+rng.IntN(2)]
		var path, hash string
		lost := map[string]bool{}
		kind := []string{"flip", "truncate", "delete"}[rng.IntN(3)]
		var at blobAt
		if rng.IntN(4) == 0 {
			path = filepath.Join(st, "checkpoints", strconv.Itoa(m.Generation), "manifest.json")
		} else {
			for hash == "" {
				f := m.Files[rng.IntN(len(m.Files))]
				if c := f.Chunks[rng.IntN(len(f.Chunks))]; !c.Zero && f.Kind != "log" {
					hash = c.Hash
				}
			}
			at = blobsOf(t, st, hash)[0]
			path = at.pack
		}
		orig := readFile(t, path)
		switch kind {
		case "flip":
			b := append([]byte(nil), orig...)
			i := rng.IntN(len(b))
			if hash != "" {
				i = int(at.off) + rng.IntN(int(at.end-at.off)) // in the blob, not the header kept twice
			}
			b[i] ^= 1 << rng.IntN(8)
			writeFile(t, path, b)
			lost[hash] = true
		case "truncate":
			cut := int64(rng.IntN(len(orig)))
			if hash != "" {
				cut = at.off - recordHeader + int64(rng.IntN(int(at.end-at.off+recordHeader)))
			}
			if err := os.Truncate(path, cut); err != nil {
				t.Fatal(err)
			}
			for _, p := range packs {
				for _, r := range p.Records {
					if p.Path == path && r.Offset+r.Len > cut {
						lost[r.Hash] = true
					}
				}
			}
		case "delete":
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			for _, p := range packs {
				for _, r := range p.Records {
					if p.Path == path {
						lost[r.Hash] = true
					}
				}
			}
		}
		wantGen := 0
		for _, g := range ms {
			if (hash == "" && g.Generation != m.Generation) || (hash != "" && !uses(g, lost)) {
				wantGen = g.Generation
			}
		}
		what := kind + " of " + filepath.Base(path)
		if os.Truncate(out, 0) != nil {
			t.Fatal("truncate output")
		}
		newest := ms[2]
		if wantGen != 3 {
			r := cryo(t, criu, "restore", "--store", st)
			if r.code != 1 || r.stdout != "" {
				t.Fatalf("round %d, %s: restore of damaged generation 3: want exit 1\n%s", round, what, r)
			}
			waitEnded(t, 10*time.Second, pidsOf(newest)...)
			if p := readProgress(t, out); len(p.steps) > 0 || p.result != "" {
				t.Fatalf("round %d, %s: the refused restore ran the job: %s", round, what, compact(p.steps))
			}
		}
		r := cryo(t, criu, "restore", "--store", st, "--fallback", "--json")
		var res struct {
			Generation int `json:"generation"`
		}
		if wantGen == 0 {
			if r.code != 1 {
				t.Fatalf("round %d, %s: no generation is intact, yet restore --fallback: %s", round, what, r)
			}
		} else {
			if r.code != 0 || json.Unmarshal([]byte(r.stdout), &res) != nil || res.Generation != wantGen {
				t.Fatalf("round %d, %s: restore --fallback: want generation %d\n%s", round, what, wantGen, r)
			}
			killAtEnd(t, j.pid)
			restoredRuns(t, ms[wantGen-1], out, want)
		}
		t.Logf("round %d: %s: fallback to generation %d", round, what, wantGen)
		writeFile(t, path, orig)
	}
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed>>1|1)) }

// TestKilledDuringKillCheckpoint: with --kill, CRIU leaves the job stopped
// until the checkpoint is committed. If cryo is killed before that, the
// job must not stay stopped for good: `cryo recover` (or any next cryo
// command on the store) continues it, and it finishes as if nothing
// happened.
func TestKilledDuringKillCheckpoint(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, false, append(storageArgs, "-delay", jobDelay)...)
	waitStep(t, out, 5, 30*time.Second)
	cryoKilledAt(t, criu, "chunks-written", "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid))
	if s := procState(j.pid); s != 'T' && s != 't' {
		t.Fatalf("after cryo was killed mid-checkpoint the job is in state %q, want stopped", s)
	}
	at := readProgress(t, out).last()
	time.Sleep(200 * time.Millisecond)
	if p := readProgress(t, out); p.last() != at {
		t.Fatalf("the stopped job went on from step %d to %d", at, p.last())
	}
	if r := cryo(t, criu, "recover", "--store", st); r.code != 0 {
		t.Fatalf("recover: %s", r)
	}
	j.waitExit(t, time.Minute)
	p := readProgress(t, out)
	checkRun(t, "continued job", p.steps, 1, 60)
	if p.result != want {
		t.Errorf("continued job finished with %q, an uninterrupted run with %q", p.result, want)
	}
	if got := committed(t, st); len(got) != 0 {
		t.Errorf("the killed checkpoint left generations %v", got)
	}
}
