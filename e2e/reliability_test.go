package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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
	cmd := exec.Command(bin("cryo"), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CRYO_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu, store.CrashEnv+"="+step)
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
// committing a checkpoint (chunks written, manifest written just before
// the rename, renamed) and in the middle of a garbage collection. After
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
	for _, step := range []string{"chunks-written", "manifest-written", "renamed"} {
		cryoKilledAt(t, criu, step, "checkpoint", "--store", st, "--leave-running", pid)
		if j.exited() {
			t.Fatalf("the job ended when cryo was killed at %s", step)
		}
		if step == "renamed" {
			wantGens = append(wantGens, len(wantGens)+1) // the rename is the commit
		}
		verifies(t, st, "a kill at "+step)
		if got := committed(t, st); !equalInts(got, wantGens) {
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
	if got := committed(t, st); !equalInts(got, wantGens) {
		t.Fatalf("after gc, list shows generations %v, want %v", got, wantGens)
	}

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

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
