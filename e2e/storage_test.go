package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

// storageArgs is the workload the storage tests checkpoint: 8 MiB of
// state, so that its pages make several chunks.
var storageArgs = []string{"-steps", "60", "-mem", "8"}

// chunkOnlyIn returns a non-zero chunk of a kind of file of manifest m that
// no other file of m and none of the manifests in others uses, so that
// damaging it damages exactly one place of one generation.
func chunkOnlyIn(t *testing.T, m *store.Manifest, kind string, others ...*store.Manifest) (store.File, int) {
	t.Helper()
	uses := map[string]int{}
	for _, mm := range append(others, m) {
		for _, f := range mm.Files {
			for _, c := range f.Chunks {
				uses[c.Hash]++
			}
		}
	}
	for _, f := range m.Files {
		if f.Kind != kind {
			continue
		}
		for i, c := range f.Chunks {
			if !c.Zero && uses[c.Hash] == 1 {
				return f, i
			}
		}
	}
	t.Fatalf("no %s chunk of generation %d is used only there", kind, m.Generation)
	return store.File{}, 0
}

// blobAt is where one copy of a chunk is: its pack and its blob's bytes.
type blobAt struct {
	pack     string
	off, end int64
}

// blobsOf lists the copies of chunk hash in the store at dir (the chunk
// itself, not its digest table).
func blobsOf(t *testing.T, dir, hash string) []blobAt {
	t.Helper()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := st.Packs()
	if err != nil {
		t.Fatal(err)
	}
	var out []blobAt
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Hash == hash && r.Kind != "digests" {
				out = append(out, blobAt{p.Path, r.Offset + recordHeader, r.Offset + r.Len})
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("no pack of %s holds chunk %s", dir, hash)
	}
	return out
}

// recordHeader is the size of a pack record's header (internal/store).
const recordHeader = 96

var flips int

// flipChunk damages every copy of chunk i of f in the store at dir in the
// middle, as a bad disk block would.
func flipChunk(t *testing.T, dir string, f store.File, i int) {
	t.Helper()
	for _, b := range blobsOf(t, dir, f.Chunks[i].Hash) {
		data := readFile(t, b.pack)
		// Somewhere else each time: flipping a flipped bit back heals it.
		flips++
		data[b.off+(b.end-b.off)*int64(flips%7+1)/9] ^= 0x55
		writeFile(t, b.pack, data)
	}
}

// cutChunk cuts the pack holding chunk i of f short in the middle of the
// chunk: it and what follows it in that pack (its index too) are lost.
func cutChunk(t *testing.T, dir string, f store.File, i int) {
	t.Helper()
	b := blobsOf(t, dir, f.Chunks[i].Hash)[0]
	if err := os.Truncate(b.pack, (b.off+b.end)/2); err != nil {
		t.Fatal(err)
	}
}

// onlyLogs reports whether chunk hash is used by log files only (which a
// restore does not need).
func onlyLogs(m *store.Manifest, hash string) bool {
	for _, f := range m.Files {
		for _, c := range f.Chunks {
			if c.Hash == hash && f.Kind != "log" {
				return false
			}
		}
	}
	return true
}

// lastChunkIn is the file and chunk (used by that file only) whose record
// comes last in its pack but for those of CRIU's log: cutting it short
// harms no other chunk that a restore needs.
func lastChunkIn(t *testing.T, dir string, m *store.Manifest) (store.File, int) {
	t.Helper()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := st.Packs()
	if err != nil {
		t.Fatal(err)
	}
	uses := map[string]int{}
	for _, f := range m.Files {
		for _, c := range f.Chunks {
			uses[c.Hash]++
		}
	}
	for _, p := range ps {
		for k := len(p.Records) - 1; k >= 0; k-- {
			r := p.Records[k]
			if r.Kind == "digests" {
				continue
			}
			for _, f := range m.Files {
				for i, c := range f.Chunks {
					if c.Hash == r.Hash && uses[c.Hash] == 1 && f.Kind != "log" {
						return f, i
					}
				}
			}
			if !onlyLogs(m, r.Hash) {
				break
			}
		}
	}
	t.Fatalf("no pack of %s ends with a chunk of one file", dir)
	return store.File{}, 0
}

// restoredRuns waits for a restored job to end and checks that it
// finished with the reference result, and that its output (appended to by
// every run) ends with the last step.
func restoredRuns(t *testing.T, m *store.Manifest, out, want string) progress {
	t.Helper()
	waitEnded(t, time.Minute, pidsOf(m)...)
	p := readProgress(t, out)
	if len(p.other) > 0 {
		t.Errorf("restored job printed %q", p.other)
	}
	if p.result != want || p.last() != 60 {
		t.Errorf("restored job ended at step %d with result %q; an uninterrupted run gives %q", p.last(), p.result, want)
	}
	return p
}

// TestReplicaRestoreHeals: a checkpoint written with --replica is a valid
// store in both places; a chunk damaged in the primary is healed from the
// replica by restore --replica before the job starts, and the job finishes
// with the right result; the primary verifies afterwards.
func TestReplicaRestoreHeals(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, rep, out := filepath.Join(dir, "store"), filepath.Join(dir, "replica"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, true, append(storageArgs, "-delay", jobDelay)...)
	waitStep(t, out, stepFirst, 30*time.Second)
	r := cryo(t, criu, "checkpoint", "--store", st, "--replica", rep, "--kill", "--json", strconv.Itoa(j.pid))
	if r.code != 0 || strings.Contains(r.stderr, "warning") {
		t.Fatalf("checkpoint --replica: %s", r)
	}
	var res struct {
		Generation   int    `json:"generation"`
		Replica      string `json:"replica"`
		ReplicaError string `json:"replica_error"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Generation != 1 || res.Replica != rep || res.ReplicaError != "" {
		t.Fatalf("checkpoint --json: %+v (%v)\n%s", res, err, r)
	}
	j.waitExit(t, 10*time.Second)
	m := manifest(t, st, 1)
	killAtEnd(t, pidsOf(m)...)

	// The replica is a store of its own, with the same generation.
	if string(readFile(t, filepath.Join(st, "checkpoints", "1", "manifest.json"))) !=
		string(readFile(t, filepath.Join(rep, "checkpoints", "1", "manifest.json"))) {
		t.Error("the replica's manifest differs from the store's")
	}
	if r := cryo(t, "", "verify", "--store", rep); r.code != 0 || !strings.Contains(r.stdout, "generation 1: intact") {
		t.Errorf("verify of the replica: %s", r)
	}

	f, i := chunkOnlyIn(t, m, "pages")
	flipChunk(t, st, f, i)
	r = cryo(t, criu, "restore", "--store", st, "--replica", rep)
	if r.code != 0 {
		t.Fatalf("restore --replica of a damaged store: %s", r)
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(r.stdout)); err != nil || pid != j.pid {
		t.Errorf("restore printed %q, want pid %d", r.stdout, j.pid)
	}
	named := f.Name + ": chunk " + strconv.Itoa(i)
	if !strings.Contains(r.stderr, "healed from the replica") || !strings.Contains(r.stderr, named) {
		t.Errorf("restore does not say it healed %s:\n%s", named, r.stderr)
	}
	restoredRuns(t, m, out, want)
	// Healed in place: the store verifies on its own now.
	if r := cryo(t, "", "verify", "--store", st); r.code != 0 {
		t.Errorf("verify after the healing restore: %s", r)
	}
}

// TestReplicaRepair: cryo repair heals flipped, missing and truncated
// chunks and a damaged manifest of the primary from the replica and says
// what it fixed; verify then passes, and the repaired generation restores
// with the right result. Damage in both copies stays broken (exit 1).
func TestReplicaRepair(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, rep, out := filepath.Join(dir, "store"), filepath.Join(dir, "replica"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, true, append(storageArgs, "-delay", jobDelay)...)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 5, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--replica", rep, pid); r.code != 0 {
		t.Fatalf("first checkpoint: %s", r)
	}
	waitStep(t, out, stepFirst, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--replica", rep, "--kill", pid); r.code != 0 {
		t.Fatalf("second checkpoint: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	m1, m2 := manifest(t, st, 1), manifest(t, st, 2)
	killAtEnd(t, pidsOf(m2)...)

	pf, pi := chunkOnlyIn(t, m2, "pages", m1)
	imgf, ii := chunkOnlyIn(t, m2, "image", m1)
	flipChunk(t, st, pf, pi)
	cutChunk(t, st, imgf, ii)
	mp := filepath.Join(st, "checkpoints", "1", "manifest.json")
	writeFile(t, mp, readFile(t, mp)[:100])

	if r := cryo(t, "", "verify", "--store", st); r.code != 1 {
		t.Fatalf("verify of the damaged store: want exit 1\n%s", r)
	}
	r := cryo(t, "", "repair", "--store", st, "--replica", rep)
	if r.code != 0 {
		t.Fatalf("repair: %s", r)
	}
	for _, s := range []string{"generation 1: repaired: manifest restored from the replica",
		"generation 2: repaired", pf.Name + ": chunk " + strconv.Itoa(pi), imgf.Name + ": chunk " + strconv.Itoa(ii)} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("repair output does not say %q:\n%s", s, r.stdout)
		}
	}
	if r := cryo(t, "", "verify", "--store", st); r.code != 0 || strings.Count(r.stdout, ": intact") != 2 {
		t.Errorf("verify after repair: %s", r)
	}
	r = cryo(t, "", "repair", "--store", st, "--replica", rep, "--json")
	var again []store.RepairResult
	if err := json.Unmarshal([]byte(r.stdout), &again); err != nil || r.code != 0 || len(again) != 2 ||
		len(again[0].Fixed)+len(again[1].Fixed) != 0 {
		t.Errorf("a second repair: want nothing to do (%v)\n%s", err, r)
	}

	// The repaired generation restores, and the job finishes right.
	r = cryo(t, criu, "restore", "--store", st)
	if r.code != 0 {
		t.Fatalf("restore after repair: %s", r)
	}
	restoredRuns(t, m2, out, want)

	// Damage that both copies share cannot be healed.
	flipChunk(t, st, pf, pi)
	flipChunk(t, rep, pf, pi)
	r = cryo(t, "", "repair", "--store", st, "--replica", rep, "--generation", "2")
	if r.code != 1 || !strings.Contains(r.stdout, "STILL BROKEN") || !strings.Contains(r.stdout, pf.Name) ||
		!strings.Contains(r.stderr, "still damaged") {
		t.Errorf("repair with both copies damaged: want exit 1 naming %s\n%s", pf.Name, r)
	}
}

// TestReplicaFailureWarns: a replica that cannot be written does not cost
// the checkpoint; it is reported on stderr and in --json. With
// --replica-required the checkpoint fails and the job goes on.
func TestReplicaFailureWarns(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	blocker := filepath.Join(dir, "file")
	writeFile(t, blocker, []byte("a file, not a directory"))
	rep := filepath.Join(blocker, "replica")
	j := startJob(t, "memstate", out, false, append(storageArgs, "-delay", jobDelay)...)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 3, 30*time.Second)

	r := cryo(t, criu, "checkpoint", "--store", st, "--replica", rep, "--json", pid)
	var res struct {
		Generation   int    `json:"generation"`
		ReplicaError string `json:"replica_error"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || r.code != 0 || res.Generation != 1 ||
		!strings.Contains(res.ReplicaError, rep) {
		t.Fatalf("checkpoint with a broken replica: want generation 1 and replica_error naming %s (%v)\n%s", rep, err, r)
	}
	if !strings.Contains(r.stderr, "warning") || !strings.Contains(r.stderr, "NOT in the replica") {
		t.Errorf("no warning on stderr:\n%s", r.stderr)
	}
	if r := cryo(t, "", "verify", "--store", st); r.code != 0 {
		t.Errorf("the checkpoint kept without its replica does not verify: %s", r)
	}

	r = cryo(t, criu, "checkpoint", "--store", st, "--replica", rep, "--replica-required", pid)
	if r.code != 1 || !strings.Contains(r.stderr, rep) {
		t.Errorf("checkpoint --replica-required with a broken replica: want exit 1 naming it\n%s", r)
	}
	if gens, _ := os.ReadDir(filepath.Join(st, "checkpoints")); len(gens) != 1 {
		t.Errorf("a failed --replica-required checkpoint left %d generations, want 1", len(gens))
	}
	if j.exited() {
		t.Error("the job ended")
	}
}

// TestFallbackRestoresOlder: when the newest generation is damaged and no
// replica can heal it, restore refuses, naming the damage and suggesting
// --fallback; with --fallback it restores the newest intact older
// generation, says which and why, and the job finishes with the right
// result.
func TestFallbackRestoresOlder(t *testing.T) {
	criu := requireCRIU(t)
	want := reference(t, "memstate", storageArgs...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, true, append(storageArgs, "-delay", jobDelay)...)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 5, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, pid); r.code != 0 {
		t.Fatalf("first checkpoint: %s", r)
	}
	waitStep(t, out, stepFirst+5, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--kill", pid); r.code != 0 {
		t.Fatalf("second checkpoint: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	stepsBefore := len(readProgress(t, out).steps)
	m1, m2 := manifest(t, st, 1), manifest(t, st, 2)
	killAtEnd(t, pidsOf(m2)...)
	f, i := chunkOnlyIn(t, m2, "pages", m1)
	flipChunk(t, st, f, i)
	named := f.Name + ": chunk " + strconv.Itoa(i)

	r := cryo(t, criu, "restore", "--store", st)
	if r.code != 1 || !strings.Contains(r.stderr, named) || !strings.Contains(r.stderr, "--fallback") || r.stdout != "" {
		t.Errorf("restore of a damaged newest generation: want exit 1 naming %s and suggesting --fallback\n%s", named, r)
	}
	r = cryo(t, criu, "restore", "--store", st, "--fallback", "--json")
	if r.code != 0 {
		t.Fatalf("restore --fallback: %s", r)
	}
	var res struct {
		PID        int `json:"pid"`
		Generation int `json:"generation"`
		Skipped    []struct {
			Generation int    `json:"generation"`
			Reason     string `json:"reason"`
		} `json:"skipped"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Generation != 1 || res.PID != j.pid ||
		len(res.Skipped) != 1 || res.Skipped[0].Generation != 2 || !strings.Contains(res.Skipped[0].Reason, named) {
		t.Errorf("restore --fallback --json: want generation 1, generation 2 skipped for %s (%v)\n%s", named, err, r)
	}
	if !strings.Contains(r.stderr, "OLDER generation 1") || !strings.Contains(r.stderr, named) {
		t.Errorf("restore --fallback does not say which generation and why:\n%s", r.stderr)
	}
	p := restoredRuns(t, m1, out, want)
	// Restored from the older state, the job did some steps again.
	if len(p.steps) <= 60 || len(p.steps) < stepsBefore {
		t.Errorf("output has %d steps; a restore of generation 1 repeats some (%s)", len(p.steps), compact(p.steps))
	}
}

// TestInspect: inspect --json describes the checkpointed tree from the
// store alone (processes with their comm and command line, non-zero
// memory, open files) and its numbers add up; it writes nothing into the
// store.
func TestInspect(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "tree", out, false, "-steps", "400", "-rec", "4096", "-delay", jobDelay)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 3, 30*time.Second)
	for range 2 {
		if r := cryo(t, criu, "checkpoint", "--store", st, pid); r.code != 0 {
			t.Fatalf("checkpoint: %s", r)
		}
	}
	m := manifest(t, st, 2)
	before := listTree(t, st)

	r := cryo(t, "", "inspect", "--store", st, "--json")
	if r.code != 0 {
		t.Fatalf("inspect --json: %s", r)
	}
	var rep struct {
		Generation int `json:"generation"`
		Processes  []struct {
			PID     int              `json:"pid"`
			PPID    int              `json:"ppid"`
			Comm    string           `json:"comm"`
			Cmdline []string         `json:"cmdline"`
			Mem     map[string]int64 `json:"memory"`
			FDs     []struct {
				FD, Type, Desc string
			} `json:"fds"`
		} `json:"processes"`
		Memory  map[string]int64 `json:"memory"`
		Dump    map[string]int64 `json:"dump"`
		Storage struct {
			RawBytes     int64   `json:"raw_bytes"`
			Chunks       int     `json:"chunks"`
			ZeroChunks   int     `json:"zero_chunks"`
			ZeroBytes    int64   `json:"zero_bytes"`
			DataBytes    int64   `json:"data_bytes"`
			StoredBytes  int64   `json:"stored_bytes"`
			UniqueChunks int     `json:"unique_chunks"`
			SharedChunks int     `json:"shared_chunks"`
			NewChunks    int     `json:"new_chunks"`
			NewBytes     int64   `json:"new_bytes"`
			Compression  float64 `json:"compression_ratio"`
			Dedup        float64 `json:"dedup_ratio"`
		} `json:"storage"`
		Files []struct {
			Name        string `json:"name"`
			Kind        string `json:"kind"`
			Size        int64  `json:"size"`
			Chunks      int    `json:"chunks"`
			StoredBytes int64  `json:"stored_bytes"`
		} `json:"files"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("inspect --json: %v\n%s", err, r.stdout)
	}
	if rep.Generation != 2 || len(rep.Processes) != len(m.Job.Processes) || len(rep.Processes) != 2 {
		t.Fatalf("inspect: generation %d with %d processes, want generation 2 with %d", rep.Generation, len(rep.Processes), len(m.Job.Processes))
	}
	var pages int64
	for _, p := range rep.Processes {
		if p.Comm != "tree" || len(p.Cmdline) == 0 || filepath.Base(p.Cmdline[0]) != "tree" {
			t.Errorf("process %d: comm %q, command line %q; want tree and its argv", p.PID, p.Comm, p.Cmdline)
		}
		if p.Mem["pages"] <= 0 || p.Mem["dumped_bytes"] != p.Mem["pages"]*int64(os.Getpagesize()) {
			t.Errorf("process %d: memory %v", p.PID, p.Mem)
		}
		byKind := p.Mem["anon_private_pages"] + p.Mem["anon_shared_pages"] + p.Mem["file_private_pages"] + p.Mem["file_shared_pages"] + p.Mem["other_pages"]
		if byKind != p.Mem["pages"] || p.Mem["zero_pages"] > p.Mem["pages"] || p.Mem["anon_private_pages"] == 0 {
			t.Errorf("process %d: pages by kind add up to %d of %d: %v", p.PID, byKind, p.Mem["pages"], p.Mem)
		}
		if len(p.FDs) == 0 {
			t.Errorf("process %d: no open files", p.PID)
		}
		pages += p.Mem["pages"]
	}
	if rep.Processes[0].PID != j.pid || rep.Processes[1].PPID != j.pid {
		t.Errorf("process tree: %d (ppid %d), %d (ppid %d); want the root %d and its child",
			rep.Processes[0].PID, rep.Processes[0].PPID, rep.Processes[1].PID, rep.Processes[1].PPID, j.pid)
	}
	if rep.Memory["pages"] != pages {
		t.Errorf("total pages %d, processes' add up to %d", rep.Memory["pages"], pages)
	}
	if rep.Dump["pages_written"] != m.Stats.PagesWritten || rep.Dump["frozen_ms"] != m.Stats.FrozenMS {
		t.Errorf("dump statistics %v differ from the manifest's %+v", rep.Dump, m.Stats)
	}

	// The storage figures add up.
	var stored, raw, pagesBytes int64
	var chunks int
	for _, f := range rep.Files {
		stored += f.StoredBytes
		raw += f.Size
		chunks += f.Chunks
		if f.Kind == "pages" {
			pagesBytes += f.Size
		}
	}
	s := rep.Storage
	if stored != s.StoredBytes || s.StoredBytes != m.Stats.StoredBytes {
		t.Errorf("files' stored bytes add up to %d, storage says %d, the manifest %d", stored, s.StoredBytes, m.Stats.StoredBytes)
	}
	if raw != s.RawBytes || s.DataBytes+s.ZeroBytes != s.RawBytes || chunks != s.Chunks {
		t.Errorf("raw %d vs %d (data %d + zero %d), chunks %d vs %d", raw, s.RawBytes, s.DataBytes, s.ZeroBytes, chunks, s.Chunks)
	}
	if pagesBytes != pages*int64(os.Getpagesize()) {
		t.Errorf("pages images hold %d bytes, the processes' pages %d", pagesBytes, pages*int64(os.Getpagesize()))
	}
	if s.UniqueChunks-s.SharedChunks != s.NewChunks || s.NewChunks != m.Stats.NewChunks || s.SharedChunks == 0 {
		t.Errorf("chunks: %d distinct, %d shared with generation 1, %d new (manifest: %d)", s.UniqueChunks, s.SharedChunks, s.NewChunks, m.Stats.NewChunks)
	}
	if s.Compression <= 0 || (s.NewBytes > 0 && s.Dedup < 1) {
		t.Errorf("ratios: compression %v, dedup %v", s.Compression, s.Dedup)
	}

	// Text mode names the tree, and nothing was written into the store.
	r = cryo(t, "", "inspect", "--store", st, "--generation", "1")
	if r.code != 0 || !strings.Contains(r.stdout, "generation 1 of") || !strings.Contains(r.stdout, "processes (2)") ||
		!strings.Contains(r.stdout, pid+" tree") || !strings.Contains(r.stdout, "CRIU dump:") {
		t.Errorf("inspect (text): %s", r)
	}
	if after := listTree(t, st); after != before {
		t.Errorf("inspect changed the store:\nbefore %s\nafter  %s", before, after)
	}
}

// listTree lists the files under dir with their sizes.
func listTree(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p == filepath.Join(dir, "lock") {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		b.WriteString(rel + ":" + strconv.FormatInt(info.Size(), 10) + " ")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}
