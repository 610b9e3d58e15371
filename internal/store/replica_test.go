package store

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// commitWith stores specs as a new generation of s, replicated to rep.
func commitWith(t *testing.T, s, rep *Store, required bool, specs []FileSpec) (int, *Writer, error) {
	t.Helper()
	w, err := s.NewWriterOpts(WriterOptions{Replica: rep, ReplicaRequired: required})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
	gen, err := w.Commit(&Manifest{})
	if err != nil {
		if aerr := w.Abort(); aerr != nil {
			t.Fatal(aerr)
		}
	}
	return gen, w, err
}

// replicaPair is a store and its replica holding one generation of three
// files: random data, zeros, and data that a second generation shares.
func replicaPair(t *testing.T) (s, rep *Store, m *Manifest, files map[string][]byte) {
	t.Helper()
	s = newStore(t)
	rep = newStore(t)
	files = map[string][]byte{
		"pages-1.img": append(memLike(1, 3*MaxChunk), make([]byte, MaxChunk)...),
		"core-1.img":  randBytes(2, 5000),
		"shared.img":  randBytes(3, 70000),
	}
	gen, w, err := commitWith(t, s, rep, false, writeSpecs(t, t.TempDir(), files))
	if err != nil || gen != 1 {
		t.Fatalf("commit: gen %d, %v", gen, err)
	}
	if err := w.ReplicaErr(); err != nil {
		t.Fatalf("ReplicaErr: %v", err)
	}
	m, err = s.ReadManifest(1)
	if err != nil {
		t.Fatal(err)
	}
	return s, rep, m, files
}

// TestReplicaWrite: the replica receives byte-identical chunks and the same
// manifest, is a valid store by itself, and gets chunks it lacks copied
// even when the primary already has them.
func TestReplicaWrite(t *testing.T) {
	s, rep, m, _ := replicaPair(t)
	a := readFile(t, filepath.Join(s.GenDir(1), "manifest.json"))
	b := readFile(t, filepath.Join(rep.GenDir(1), "manifest.json"))
	if !bytes.Equal(a, b) {
		t.Error("the replica's manifest differs from the store's")
	}
	rm, err := rep.ReadManifest(1)
	if err != nil {
		t.Fatalf("the replica's manifest does not read: %v", err)
	}
	if ps := rep.Verify(context.Background(), rm); len(ps) > 0 {
		t.Errorf("the replica does not verify: %v", ps)
	}
	if ps := rep.Quick(rm); len(ps) > 0 {
		t.Errorf("the replica's chunks differ in size from the manifest: %v", ps)
	}
	for _, f := range m.Files {
		for _, c := range f.Chunks {
			if c.Zero {
				continue // nothing stored, and nothing to name it by
			}
			if !bytes.Equal(blobBytes(t, s, c.Hash), blobBytes(t, rep, c.Hash)) {
				t.Errorf("%s: chunk %s differs between store and replica", f.Name, c.Hash)
			}
		}
	}
	if n, k := countChunks(t, s), countChunks(t, rep); n != k {
		t.Errorf("store has %d chunk files, replica %d", n, k)
	}

	// The replica lost a chunk that the next generation reuses: the writer
	// copies it over from the store, which already has it.
	shared := chunkOf(m, "shared.img")
	if err := os.Remove(chunkFile(t, rep, shared.Hash)); err != nil {
		t.Fatal(err)
	}
	gen, w, err := commitWith(t, s, rep, false, writeSpecs(t, t.TempDir(), map[string][]byte{
		"shared.img": randBytes(3, 70000), "new.img": randBytes(4, 9000)}))
	if err != nil || gen != 2 {
		t.Fatalf("second commit: gen %d, %v", gen, err)
	}
	if chunks, _ := w.ReplicaStats(); chunks != 2 {
		t.Errorf("ReplicaStats: %d chunks written to the replica, want 2 (the lost one and the new one)", chunks)
	}
	rm2, err := rep.ReadManifest(2)
	if err != nil {
		t.Fatal(err)
	}
	if ps := rep.Verify(context.Background(), rm2); len(ps) > 0 {
		t.Errorf("generation 2 of the replica: %v", ps)
	}
}

// TestReplicaNumbering: a generation the replica committed but the store
// did not (a crash between the two commits) is never reused as a number.
func TestReplicaNumbering(t *testing.T) {
	s, rep, _, _ := replicaPair(t)
	if err := os.Rename(rep.GenDir(1), rep.GenDir(5)); err != nil {
		t.Fatal(err)
	}
	gen, _, err := commitWith(t, s, rep, false, writeSpecs(t, t.TempDir(), map[string][]byte{"a.img": randBytes(9, 100)}))
	if err != nil || gen != 6 {
		t.Fatalf("commit after the replica got ahead: gen %d, %v; want 6", gen, err)
	}
	for _, st := range []*Store{s, rep} {
		if _, err := st.ReadManifest(6); err != nil {
			t.Errorf("%s: %v", st.Dir, err)
		}
	}
}

// TestReplicaFailure: a replica that cannot be written costs the replica
// copy, never the checkpoint, unless the replica is required.
func TestReplicaFailure(t *testing.T) {
	for _, required := range []bool{false, true} {
		t.Run(map[bool]string{false: "optional", true: "required"}[required], func(t *testing.T) {
			s, rep := newStore(t), newStore(t)
			// A file where the chunk directories go: every chunk write fails.
			if err := os.RemoveAll(filepath.Join(rep.Dir, "packs")); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(rep.Dir, "packs"), []byte("not a directory"))
			gen, w, err := commitWith(t, s, rep, required, writeSpecs(t, t.TempDir(), map[string][]byte{"a.img": randBytes(5, 3000)}))
			gens, _ := rep.Generations()
			if len(gens) != 0 {
				t.Errorf("the broken replica has generations %v", gens)
			}
			if ents, _ := os.ReadDir(filepath.Join(rep.Dir, "staging")); len(ents) != 0 {
				t.Errorf("the replica's staging holds %v", names(ents))
			}
			if required {
				if err == nil || !strings.Contains(err.Error(), "replica") {
					t.Errorf("Commit with a required broken replica: %v", err)
				}
				if gens, _ := s.Generations(); len(gens) != 0 {
					t.Errorf("the store committed %v although the replica is required", gens)
				}
				return
			}
			if err != nil || gen != 1 {
				t.Fatalf("Commit with a broken optional replica: gen %d, %v", gen, err)
			}
			if rerr := w.ReplicaErr(); rerr == nil || !strings.Contains(rerr.Error(), rep.Dir) {
				t.Errorf("ReplicaErr = %v, want an error naming %s", rerr, rep.Dir)
			}
			m, err := s.ReadManifest(1)
			if err != nil {
				t.Fatal(err)
			}
			if ps := s.Verify(context.Background(), m); len(ps) > 0 {
				t.Errorf("the store's generation does not verify: %v", ps)
			}
		})
	}
}

// TestReplicaHealsPrimaryOnWrite: a damaged chunk of the store that a new
// generation reuses is rewritten from the fresh data while it is copied to
// the replica.
func TestReplicaHealsPrimaryOnWrite(t *testing.T) {
	s := newStore(t)
	data := randBytes(6, 40000)
	commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"a.img": data}), nil)
	m, _ := s.ReadManifest(1)
	c := chunkOf(m, "a.img")
	flipBlob(t, s, c.Hash)

	rep := newStore(t)
	if _, _, err := commitWith(t, s, rep, false, writeSpecs(t, t.TempDir(), map[string][]byte{"a.img": data})); err != nil {
		t.Fatal(err)
	}
	for _, st := range []*Store{s, rep} {
		m, err := st.ReadManifest(2)
		if err != nil {
			t.Fatal(err)
		}
		if ps := st.Verify(context.Background(), m); len(ps) > 0 {
			t.Errorf("%s: %v", st.Dir, ps)
		}
	}
}

// TestRepair heals flipped, missing and truncated chunks and a damaged
// manifest from the replica, reports each, and leaves the generation
// verifying; what the replica cannot supply stays reported as broken.
func TestRepair(t *testing.T) {
	ctx := context.Background()
	s, rep, m, _ := replicaPair(t)
	pages := m.Files[fileIndex(m, "pages-1.img")]
	flipBlob(t, s, pages.Chunks[0].Hash)
	if err := os.Remove(chunkFile(t, s, pages.Chunks[1].Hash)); err != nil {
		t.Fatal(err)
	}
	core := chunkOf(m, "core-1.img")
	if err := os.Truncate(chunkFile(t, s, core.Hash), 10); err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(s.GenDir(1), "manifest.json")
	mb := readFile(t, mp)
	writeFile(t, mp, mb[:len(mb)/3])

	res := s.Repair(ctx, rep, 1)
	if !res.Intact || len(res.Broken) > 0 {
		t.Fatalf("Repair: %+v", res)
	}
	if len(res.Fixed) != 3 || res.Manifest == "" {
		t.Errorf("Repair fixed %d chunks (want 3) and the manifest %q (want restored): %+v", len(res.Fixed), res.Manifest, res.Fixed)
	}
	for _, p := range res.Fixed {
		if !strings.Contains(p.Reason, "restored from the replica") || p.File == "" {
			t.Errorf("fixed problem does not say what and how: %+v", p)
		}
	}
	m2, err := s.ReadManifest(1)
	if err != nil {
		t.Fatalf("manifest after repair: %v", err)
	}
	if ps := s.Verify(ctx, m2); len(ps) > 0 {
		t.Errorf("Verify after Repair: %v", ps)
	}
	if ps := s.Quick(m2); len(ps) > 0 {
		t.Errorf("Quick after Repair: %v", ps)
	}
	if again := s.Repair(ctx, rep, 1); !again.Intact || len(again.Fixed) != 0 || again.Manifest != "" {
		t.Errorf("a second Repair did something: %+v", again)
	}

	// Damage in both copies cannot be healed, and says so.
	flipBlob(t, s, core.Hash)
	flipBlob(t, rep, core.Hash)
	res = s.Repair(ctx, rep, 1)
	if res.Intact || len(res.Broken) != 1 || res.Broken[0].File != "core-1.img" ||
		!strings.Contains(res.Broken[0].Reason, "replica") {
		t.Errorf("Repair with both copies damaged: %+v", res)
	}
}

// TestRepairCopiesMissingGeneration: a generation the store lacks is
// copied from the replica, chunks and all.
func TestRepairCopiesMissingGeneration(t *testing.T) {
	s, rep, m, _ := replicaPair(t)
	if err := s.Remove(1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(); err != nil {
		t.Fatal(err)
	}
	res := s.Repair(context.Background(), rep, 1)
	if !res.Intact || res.Manifest != "copied from the replica" || len(res.Fixed) == 0 {
		t.Fatalf("Repair of a missing generation: %+v", res)
	}
	got, err := s.ReadManifest(1)
	if err != nil || got.Checksum != m.Checksum {
		t.Errorf("copied manifest: %v", err)
	}
	if res := s.Repair(context.Background(), rep, 7); res.Intact || len(res.Broken) == 0 ||
		!strings.Contains(res.Broken[0].Reason, "no such generation") {
		t.Errorf("Repair of a generation neither has: %+v", res)
	}
}

// TestMaterializeFrom heals what a restore trips over and writes the right
// content; without a replica the damage is an ErrCorrupt naming the chunk.
func TestMaterializeFrom(t *testing.T) {
	ctx := context.Background()
	s, rep, m, files := replicaPair(t)
	pages := m.Files[fileIndex(m, "pages-1.img")]
	flipBlob(t, s, pages.Chunks[1].Hash)

	if err := s.Materialize(ctx, m, t.TempDir()); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "pages-1.img: chunk 1") {
		t.Fatalf("Materialize of a damaged generation: %v", err)
	}
	dir := t.TempDir()
	healed, err := s.MaterializeFrom(ctx, m, dir, rep)
	if err != nil {
		t.Fatalf("MaterializeFrom: %v", err)
	}
	if len(healed) != 1 || healed[0].File != "pages-1.img" || healed[0].Chunk != 1 {
		t.Errorf("healed %+v, want pages-1.img chunk 1", healed)
	}
	for name, want := range files {
		if !bytes.Equal(readFile(t, filepath.Join(dir, name)), want) {
			t.Errorf("%s materialized wrong", name)
		}
	}
	if ps := s.Verify(ctx, m); len(ps) > 0 {
		t.Errorf("the store still has damage after a healing materialize: %v", ps)
	}

	// A manifest healed for a restore.
	writeFile(t, filepath.Join(s.GenDir(1), "manifest.json"), []byte("{"))
	if _, err := s.ReadManifest(1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("damaged manifest: %v", err)
	}
	hm, err := s.HealManifest(rep, 1)
	if err != nil || hm.Checksum != m.Checksum {
		t.Fatalf("HealManifest: %v", err)
	}
	if _, err := s.ReadManifest(1); err != nil {
		t.Errorf("manifest after HealManifest: %v", err)
	}
	if _, err := s.HealManifest(rep, 9); !errors.Is(err, ErrNoGeneration) {
		t.Errorf("HealManifest of a generation the store never had: %v", err)
	}
}

// TestReadAt reads ranges across chunk boundaries and zero chunks, and
// reads only the chunks it needs.
func TestReadAt(t *testing.T) {
	s, _, m, files := replicaPair(t)
	data := files["pages-1.img"]
	for _, r := range [][2]int64{{0, 10}, {MaxChunk - 5, 10}, {3*MaxChunk/2 - 3, 9}, {int64(len(data)) - 4, 100}, {5, 0}} {
		got, err := s.ReadAt(m, "pages-1.img", r[0], r[1])
		if err != nil {
			t.Fatalf("ReadAt %v: %v", r, err)
		}
		want := data[r[0]:min(r[0]+r[1], int64(len(data)))]
		if !bytes.Equal(got, want) {
			t.Errorf("ReadAt %v: %d bytes, not the file's", r, len(got))
		}
	}
	// Damage the last (non-zero) chunk: the first bytes still read.
	pages := m.Files[fileIndex(m, "pages-1.img")]
	flipBlob(t, s, pages.Chunks[1].Hash)
	if _, err := s.ReadAt(m, "pages-1.img", 0, 100); err != nil {
		t.Errorf("ReadAt read a chunk it did not need: %v", err)
	}
	if _, err := s.ReadAt(m, "pages-1.img", MaxChunk+10, 100); !errors.Is(err, ErrCorrupt) {
		t.Errorf("ReadAt of a damaged chunk: %v", err)
	}
	if _, err := s.ReadAt(m, "nope.img", 0, 1); err == nil {
		t.Error("ReadAt of a missing file succeeded")
	}
}

// TestProgressCounts: writers and verification count the bytes they
// process.
func TestProgressCounts(t *testing.T) {
	s, _, m, _ := replicaPair(t)
	p := &Progress{}
	s.Progress = p
	if ps := s.Verify(context.Background(), m); len(ps) > 0 {
		t.Fatal(ps)
	}
	if p.Done() != m.RawBytes() || p.Total() != m.RawBytes() {
		t.Errorf("verify progress %d/%d, want %d/%d", p.Done(), p.Total(), m.RawBytes(), m.RawBytes())
	}
	var nilp *Progress
	nilp.Add(1) // a nil Progress counts nothing and does not crash
	if nilp.Done() != 0 {
		t.Error("nil progress counted")
	}
}

func fileIndex(m *Manifest, name string) int {
	for i, f := range m.Files {
		if f.Name == name {
			return i
		}
	}
	return -1
}
