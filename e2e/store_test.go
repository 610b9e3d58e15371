package e2e

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// TestCorruptStore damages copies of a real checkpoint in several ways and
// checks that verify names the damage, that list reports it where it can
// see it, and that restore refuses before it starts any process.
func TestCorruptStore(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	orig, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, false, "-steps", "400", "-mem", "8", "-delay", "20ms")
	waitStep(t, out, 5, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", orig, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	if r := cryo(t, "", "verify", "--store", orig); r.code != 0 || !strings.Contains(r.stdout, "generation 1: intact") {
		t.Fatalf("verify of a fresh checkpoint: %s", r)
	}
	m := manifest(t, orig, 1)

	// Damage a chunk that only one file references, so that exactly one
	// file and chunk are to blame. Cutting a pack short loses what follows
	// the cut, so the chunk cut is the last of its pack.
	pagesFile, pagesChunk := chunkOnlyIn(t, m, "pages")
	lastFile, lastChunk := lastChunkIn(t, orig, m)

	tests := []struct {
		name   string
		damage func(t *testing.T, st string) string // returns what the messages must name
		// listSees: list (which checks presence and sizes only) calls the
		// generation broken, naming the damaged file unless listAny (the
		// cut loses CRIU's log after it too, and list may name that).
		listSees, listAny bool
	}{
		{"flipped byte in a page chunk", func(t *testing.T, st string) string {
			flipChunk(t, st, pagesFile, pagesChunk)
			return pagesFile.Name + ": chunk " + strconv.Itoa(pagesChunk)
		}, false, false},
		{"pack cut short in its last chunk", func(t *testing.T, st string) string {
			cutChunk(t, st, lastFile, lastChunk)
			return lastFile.Name + ": chunk " + strconv.Itoa(lastChunk)
		}, true, true},
		{"deleted pack", func(t *testing.T, st string) string {
			packs, _ := filepath.Glob(filepath.Join(st, "packs", "*.pack"))
			for _, p := range packs {
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
			}
			return "missing"
		}, true, false},
		{"truncated manifest", func(t *testing.T, st string) string {
			p := filepath.Join(st, "checkpoints", "1", "manifest.json")
			b := readFile(t, p)
			writeFile(t, p, b[:len(b)/2])
			return p
		}, true, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := filepath.Join(t.TempDir(), "store")
			copyDir(t, orig, st)
			names := tc.damage(t, st)

			r := cryo(t, "", "verify", "--store", st)
			if r.code != 1 || !strings.Contains(r.stdout, names) || !strings.Contains(r.stdout, "BAD") {
				t.Errorf("verify: want exit 1 naming %q\n%s", names, r)
			}

			r = cryo(t, "", "list", "--store", st, "--json")
			var gens []struct {
				Intact  bool   `json:"intact"`
				Problem string `json:"problem"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || r.code != 0 || len(gens) != 1 {
				t.Fatalf("list --json: %v\n%s", err, r)
			}
			if gens[0].Intact == tc.listSees || (tc.listSees && !tc.listAny && !strings.Contains(gens[0].Problem, strings.SplitN(names, ": chunk", 2)[0])) {
				t.Errorf("list --json says intact=%v, problem %q; want intact=%v naming %q", gens[0].Intact, gens[0].Problem, !tc.listSees, names)
			}

			r = cryo(t, criu, "restore", "--store", st)
			if r.code != 1 || !strings.Contains(r.stderr, names) || !strings.Contains(r.stderr, "corrupt") {
				t.Errorf("restore: want exit 1 saying the checkpoint is corrupt and naming %q\n%s", names, r)
			}
			if r.stdout != "" {
				t.Errorf("a refused restore printed %q", r.stdout)
			}
			// Nothing was started: no process holds the job's PID or runs
			// its program, and CRIU never ran (it would have left a log).
			if proc.Exists(m.Job.RootPID) && ours(m.Job.RootPID) {
				t.Errorf("pid %d runs the job again after a refused restore", m.Job.RootPID)
			}
			if pids := running(t, bin("memstate")); len(pids) > 0 {
				t.Errorf("processes %v run the job's program after a refused restore", pids)
			}
			if logs, _ := filepath.Glob(filepath.Join(st, "logs", "*restore*")); len(logs) > 0 {
				t.Errorf("CRIU ran although the checkpoint is corrupt: %v", logs)
			}
		})
	}
}

// TestStagingDebris simulates a cryo killed in the middle of a checkpoint:
// what it left in staging/ (even a manifest) is never listed as a
// checkpoint, and the next checkpoint removes it, along with the RAM work
// directory the dead cryo left.
func TestStagingDebris(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, false, "-steps", "400", "-mem", "8", "-delay", "20ms")
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 3, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}

	half := filepath.Join(st, "staging", "gen-31337")
	mustMkdir(t, filepath.Join(half, "images"))
	writeFile(t, filepath.Join(half, "images", "pages-1.img"), []byte("half a page image"))
	writeFile(t, filepath.Join(half, "manifest.json"), readFile(t, filepath.Join(st, "checkpoints", "1", "manifest.json")))
	removing := filepath.Join(st, "staging", "removing-1")
	mustMkdir(t, removing)
	work := filepath.Join("/dev/shm", "cryo-work-"+strconv.Itoa(freePID(t))+"-e2e")
	mustMkdir(t, filepath.Join(work, "images"))
	t.Cleanup(func() { os.RemoveAll(work) })

	r := cryo(t, "", "list", "--store", st, "--json")
	var gens []struct {
		Generation int  `json:"generation"`
		Intact     bool `json:"intact"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || len(gens) != 1 || gens[0].Generation != 1 {
		t.Errorf("list with debris in staging: want generation 1 only (%v)\n%s", err, r)
	}
	if r := cryo(t, "", "verify", "--store", st); r.code != 0 || strings.Count(r.stdout, "generation") != 1 {
		t.Errorf("verify with debris in staging: %s", r)
	}

	r = cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid)
	if r.code != 0 || !strings.Contains(r.stdout, "generation 2 ") {
		t.Fatalf("checkpoint after a killed one: want generation 2\n%s", r)
	}
	for _, p := range []string{half, removing, work} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("the next checkpoint left the debris %s", p)
		}
	}
	r = cryo(t, "", "list", "--store", st, "--json")
	if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || len(gens) != 2 || !gens[0].Intact || !gens[1].Intact {
		t.Errorf("list after cleanup: want generations 1 and 2, intact (%v)\n%s", err, r)
	}
	if j.exited() {
		t.Error("the job ended")
	}
}

// TestNoSuchJob checkpoints a PID that no process holds.
func TestNoSuchJob(t *testing.T) {
	requireBinaries(t)
	st := filepath.Join(t.TempDir(), "store")
	pid := strconv.Itoa(freePID(t))
	r := cryo(t, criuOrStandIn(), "checkpoint", "--store", st, pid)
	if r.code != 1 || !strings.Contains(r.stderr, "pid "+pid) || !strings.Contains(r.stderr, "no such process") {
		t.Errorf("checkpoint of a free pid: want exit 1 naming pid %s as missing\n%s", pid, r)
	}
	if _, err := os.Stat(st); err == nil {
		t.Errorf("a failed checkpoint of a missing process created the store %s", st)
	}
}

// TestNoStore asks for checkpoints from stores that do not exist or hold
// none.
func TestNoStore(t *testing.T) {
	requireBinaries(t)
	missing := filepath.Join(t.TempDir(), "nowhere")
	criu := criuOrStandIn()
	for _, args := range [][]string{
		{"restore", "--store", missing},
		{"list", "--store", missing},
		{"verify", "--store", missing},
		{"gc", "--store", missing},
	} {
		r := cryo(t, criu, args...)
		if r.code != 1 || !strings.Contains(r.stderr, "not a cryo store") || !strings.Contains(r.stderr, missing) {
			t.Errorf("cryo %s: want exit 1 saying %s is not a cryo store\n%s", strings.Join(args, " "), missing, r)
		}
	}
	if _, err := os.Stat(missing); err == nil {
		t.Errorf("a command on a missing store created %s", missing)
	}

	empty := filepath.Join(t.TempDir(), "empty")
	if _, err := store.Create(empty, "e2e"); err != nil {
		t.Fatal(err)
	}
	r := cryo(t, criu, "restore", "--store", empty)
	if r.code != 1 || !strings.Contains(r.stderr, "no checkpoints") {
		t.Errorf("restore from an empty store: want exit 1 saying it holds no checkpoints\n%s", r)
	}
	r = cryo(t, criu, "restore", "--store", empty, "--generation", "3")
	if r.code != 1 || !strings.Contains(r.stderr, "no such generation") {
		t.Errorf("restore of a missing generation: want exit 1 saying there is no such generation\n%s", r)
	}
}

// criuOrStandIn is the CRIU to name for commands that must fail before
// they would run it: the real one when present, else /bin/true.
func criuOrStandIn() string {
	if p, err := findCRIU(); err == nil {
		return p
	}
	return "/bin/true"
}

// running lists the processes (not zombies) whose executable is exe.
func running(t *testing.T, exe string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && p == exe && alive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// copyDir copies a directory tree, keeping permissions.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(dst, info.Mode().Perm())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, info.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

func mustMkdir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
