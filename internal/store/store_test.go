package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCreateOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b", "store")
	s, err := Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	if s.Dir != dir {
		t.Errorf("Dir = %q, want %q", s.Dir, dir)
	}
	for _, d := range []string{"", "packs", "checkpoints", "staging", "logs"} {
		assertMode(t, filepath.Join(dir, d), os.ModeDir|0o700)
	}
	assertMode(t, filepath.Join(dir, metaName), 0o600)

	if _, err := Open(dir); err != nil {
		t.Errorf("Open of a new store: %v", err)
	}
	// Creating an existing store opens it and keeps what is in it.
	marker := filepath.Join(dir, "checkpoints", "7")
	if err := os.Mkdir(marker, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(dir, "cryo test"); err != nil {
		t.Errorf("Create of an existing store: %v", err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("Create of an existing store lost its contents: %v", err)
	}
}

func TestOpenRefuses(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, dir string)
		wantNo  bool   // errors.Is(err, ErrNoStore)
		wantMsg string // substring of the error
	}{
		{"missing", func(*testing.T, string) {}, true, "does not exist"},
		{"empty dir", func(t *testing.T, dir string) { mkdir(t, dir) }, true, "has no " + metaName},
		{"plain file", func(t *testing.T, dir string) { writeFile(t, dir, []byte("x")) }, true, "not a directory"},
		{"damaged meta", func(t *testing.T, dir string) {
			mkdir(t, dir)
			writeFile(t, filepath.Join(dir, metaName), []byte(`{"format":`))
		}, true, "damaged"},
		{"other format", func(t *testing.T, dir string) {
			mkdir(t, dir)
			writeFile(t, filepath.Join(dir, metaName), []byte(`{"format":99}`))
		}, false, "format 99"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "s")
			tc.setup(t, dir)
			_, err := Open(dir)
			if err == nil {
				t.Fatal("Open succeeded")
			}
			if errors.Is(err, ErrNoStore) != tc.wantNo {
				t.Errorf("errors.Is(%v, ErrNoStore) = %v, want %v", err, !tc.wantNo, tc.wantNo)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) || !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q should name %s and say %q", err, dir, tc.wantMsg)
			}
		})
	}
}

func TestCreateRefusesForeignDir(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "results.csv"), []byte("precious"))
	_, err := Create(dir, "cryo test")
	if !errors.Is(err, ErrNoStore) {
		t.Fatalf("Create in a non-empty foreign directory: err = %v, want ErrNoStore", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("Create wrote into a foreign directory: %v", ents)
	}
}

func TestRoundTrip(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	files := map[string][]byte{
		"empty.img":        {},
		"one.img":          {42},
		"core-1.img":       randBytes(1, 10_000),
		"pages-1.img":      randBytes(2, 3*MaxChunk+12_345),
		"sub/dir/deep.img": randBytes(3, 4096),
	}
	specs := writeSpecs(t, src, files)
	specs[3].Cuts = []int64{5000, 700_000}
	for i := range specs {
		if specs[i].Name == "pages-1.img" {
			specs[i].Kind = "pages"
		}
	}
	gen, m := commit(t, s, specs, func(m *Manifest) {
		m.Host = "node7"
		m.Job = Job{RootPID: 4242, Processes: []Process{{PID: 4242, PPID: 1, Threads: 3, TIDs: []int{4242, 4243, 4244}, Comm: "solver (rank 0)"}}}
		m.CRIU = CRIUInfo{Version: "4.1.1", TCPEstablished: true}
		m.Stats.FrozenMS = 12
	})
	if gen != 1 {
		t.Fatalf("first generation is %d, want 1", gen)
	}

	got, err := s.ReadManifest(gen)
	if err != nil {
		t.Fatal(err)
	}
	if got.Format != FormatVersion || got.Generation != 1 || got.Host != "node7" || got.Job.RootPID != 4242 ||
		got.Job.Processes[0].Comm != "solver (rank 0)" || len(got.Job.Processes[0].TIDs) != 3 ||
		got.CRIU.Version != "4.1.1" || !got.CRIU.TCPEstablished || got.Stats.FrozenMS != 12 {
		t.Errorf("manifest did not round-trip: %+v", got)
	}
	if len(got.Files) != len(files) {
		t.Fatalf("manifest has %d files, want %d", len(got.Files), len(files))
	}
	var raw int64
	for _, f := range got.Files {
		raw += int64(len(files[f.Name]))
		if f.Size != int64(len(files[f.Name])) {
			t.Errorf("%s: size %d, want %d", f.Name, f.Size, len(files[f.Name]))
		}
		for _, c := range f.Chunks {
			if c.Len > MaxChunk {
				t.Errorf("%s: chunk of %d bytes exceeds MaxChunk", f.Name, c.Len)
			}
			if c.Zero {
				continue // zero chunks have no file
			}
			assertMode(t, chunkFile(t, s, c.Hash), 0o600)
			assertMode(t, filepath.Dir(chunkFile(t, s, c.Hash)), os.ModeDir|0o700)
		}
	}
	if got.Stats.RawBytes != raw || m.Stats.RawBytes != raw {
		t.Errorf("RawBytes = %d (returned %d), want %d", got.Stats.RawBytes, m.Stats.RawBytes, raw)
	}
	// The page file was cut at the requested offsets.
	for _, f := range got.Files {
		if f.Name == "pages-1.img" {
			if f.Chunks[0].Len != 5000 || f.Chunks[1].Len != 700_000-5000 {
				t.Errorf("pages-1.img not cut at 5000 and 700000: chunk lengths %d, %d", f.Chunks[0].Len, f.Chunks[1].Len)
			}
		}
	}

	// The generation directory holds exactly the manifest; staging is empty.
	ents, _ := os.ReadDir(s.GenDir(gen))
	if len(ents) != 1 || ents[0].Name() != "manifest.json" {
		t.Errorf("generation directory holds %v, want only manifest.json", names(ents))
	}
	assertMode(t, s.GenDir(gen), os.ModeDir|0o700)
	assertMode(t, filepath.Join(s.GenDir(gen), "manifest.json"), 0o600)
	if ents, _ := os.ReadDir(filepath.Join(s.Dir, "staging")); len(ents) != 0 {
		t.Errorf("staging not empty after commit: %v", names(ents))
	}

	out := t.TempDir()
	if err := s.Materialize(context.Background(), got, out); err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		b, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Errorf("materialized %s: %v", name, err)
			continue
		}
		if !slices.Equal(b, want) {
			t.Errorf("materialized %s differs from the original (%d bytes, want %d)", name, len(b), len(want))
		}
	}
	if ps := s.Verify(context.Background(), got); len(ps) != 0 {
		t.Errorf("Verify of an intact generation: %v", ps)
	}
	if ps := s.Quick(got); len(ps) != 0 {
		t.Errorf("Quick of an intact generation: %v", ps)
	}

	// The next generation gets the next number.
	if gen2, _ := commit(t, s, specs, nil); gen2 != 2 {
		t.Errorf("second generation is %d, want 2", gen2)
	}
	if gens, _ := s.Generations(); !slices.Equal(gens, []int{1, 2}) {
		t.Errorf("Generations = %v, want [1 2]", gens)
	}
}

func TestMaterializeKinds(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	specs := writeSpecs(t, src, map[string][]byte{"core.img": []byte("core"), "pages-1.img": []byte("pages"), "dump.log": []byte("log")})
	for i := range specs {
		switch specs[i].Name {
		case "dump.log":
			specs[i].Kind = "log"
		case "pages-1.img":
			specs[i].Kind = "pages"
		}
	}
	_, m := commit(t, s, specs, nil)
	tests := []struct {
		kinds []string
		want  []string
	}{
		{nil, []string{"core.img", "pages-1.img"}},
		{[]string{"log"}, []string{"dump.log"}},
		{[]string{"image", "pages", "log"}, []string{"core.img", "dump.log", "pages-1.img"}},
	}
	for _, tc := range tests {
		out := t.TempDir()
		if err := s.Materialize(context.Background(), m, out, tc.kinds...); err != nil {
			t.Fatal(err)
		}
		ents, _ := os.ReadDir(out)
		if got := names(ents); !slices.Equal(got, tc.want) {
			t.Errorf("Materialize(kinds %v) wrote %v, want %v", tc.kinds, got, tc.want)
		}
	}
}

func TestDedup(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	files := map[string][]byte{
		"pages-1.img": randBytes(7, 2*MaxChunk+100),
		"core-1.img":  randBytes(8, 3000),
		"zeros.img":   make([]byte, 3*MaxChunk),                                  // zero chunks: not stored at all
		"twice.img":   append(randBytes(9, MaxChunk), randBytes(9, MaxChunk)...), // identical chunks within one generation
	}
	specs := writeSpecs(t, src, files)
	_, m1 := commit(t, s, specs, nil)
	if m1.Stats.NewChunks != 5 || m1.Stats.Chunks != 9 {
		t.Errorf("first generation: %d new of %d chunks, want 5 of 9 (zero chunks not stored, the repeated one once)", m1.Stats.NewChunks, m1.Stats.Chunks)
	}
	before := countChunks(t, s)
	if before != 5 {
		t.Errorf("%d chunk files in the store, want 5", before)
	}

	_, m2 := commit(t, s, specs, nil)
	if m2.Stats.NewChunks != 0 || m2.Stats.NewBytes != 0 {
		t.Errorf("same content again added %d chunks (%d bytes), want none", m2.Stats.NewChunks, m2.Stats.NewBytes)
	}
	if m2.Stats.StoredBytes != m1.Stats.StoredBytes {
		t.Errorf("StoredBytes %d, first generation %d", m2.Stats.StoredBytes, m1.Stats.StoredBytes)
	}
	if n := countChunks(t, s); n != before {
		t.Errorf("store grew from %d to %d chunks for unchanged content", before, n)
	}

	// One changed byte changes one chunk.
	files["pages-1.img"][MaxChunk+10] ^= 0xff
	specs = writeSpecs(t, src, files)
	_, m3 := commit(t, s, specs, nil)
	if m3.Stats.NewChunks != 1 {
		t.Errorf("one changed byte added %d chunks, want 1", m3.Stats.NewChunks)
	}
}

// TestAddressWindowCuts checks the point of cutting page images where
// address windows begin: when a new run of pages appears in front of
// memory that did not change, only the new run is stored again.
func TestAddressWindowCuts(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	x, y, z := randBytes(10, 300<<10), randBytes(11, 700<<10), randBytes(12, 100<<10)

	write := func(name string, parts ...[]byte) string {
		p := filepath.Join(src, name)
		writeFile(t, p, slices.Concat(parts...))
		return p
	}
	// Generation 1: runs X, Y. Generation 2: a new run Z, then X and Y,
	// which now sit at other offsets of the pages file.
	_, m1 := commit(t, s, []FileSpec{{Path: write("a", x, y), Name: "pages-1.img", Kind: "pages", Cuts: []int64{0, 300 << 10}}}, nil)
	_, m2 := commit(t, s, []FileSpec{{Path: write("b", z, x, y), Name: "pages-1.img", Kind: "pages", Cuts: []int64{0, 100 << 10, 400 << 10}}}, nil)
	if m1.Stats.NewChunks != 2 || m2.Stats.Chunks != 3 || m2.Stats.NewChunks != 1 {
		t.Errorf("generation 1: %d new chunks (want 2); generation 2: %d new of %d (want 1 of 3)",
			m1.Stats.NewChunks, m2.Stats.NewChunks, m2.Stats.Chunks)
	}
	// Without the cuts, every fixed-size chunk after Z would differ.
	_, m3 := commit(t, s, []FileSpec{{Path: write("c", x, z, y), Name: "pages-1.img", Kind: "pages"}}, nil)
	if m3.Stats.NewChunks != m3.Stats.Chunks {
		t.Errorf("uncut file shared %d chunks with earlier generations; want none (test data too regular?)", m3.Stats.Chunks-m3.Stats.NewChunks)
	}
}

func TestSplitPoints(t *testing.T) {
	const M = MaxChunk
	tests := []struct {
		name string
		size int64
		cuts []int64
		want []int64
	}{
		{"empty file", 0, nil, []int64{0, 0}},
		{"small", 10, nil, []int64{0, 10}},
		{"exactly MaxChunk", M, nil, []int64{0, M}},
		{"one over", M + 1, nil, []int64{0, M, M + 1}},
		{"several", 2*M + M/2, nil, []int64{0, M, 2 * M, 2*M + M/2}},
		{"cut inside", 100, []int64{30}, []int64{0, 30, 100}},
		{"cuts at the ends ignored", 100, []int64{0, 100, 150}, []int64{0, 100}},
		{"duplicate and unsorted cuts ignored", 100, []int64{30, 30, 20, 60}, []int64{0, 30, 60, 100}},
		{"MaxChunk counted from the last cut", 3 * M, []int64{M / 2}, []int64{0, M / 2, M + M/2, 2*M + M/2, 3 * M}},
		{"long gap before a cut", 3 * M, []int64{2*M + 5}, []int64{0, M, 2 * M, 2*M + 5, 3 * M}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := splitPoints(tc.size, tc.cuts)
			if !slices.Equal(got, tc.want) {
				t.Errorf("splitPoints(%d, %v) = %v, want %v", tc.size, tc.cuts, got, tc.want)
			}
		})
	}
}

func TestCorruptChunk(t *testing.T) {
	tests := []struct {
		name      string
		damage    func(t *testing.T, s *Store, hash string)
		reason    string
		quickSees bool // the damage changes the chunk's size or presence
	}{
		{"flipped byte", flipBlob, "", false},
		{"truncated", func(t *testing.T, s *Store, hash string) {
			// Into the blob: its record no longer reads, nor the index.
			_, r := recordOf(t, s, hash)
			if err := os.Truncate(chunkFile(t, s, hash), r.Offset+recHeader+7); err != nil {
				t.Fatal(err)
			}
		}, "missing", true},
		{"deleted", func(t *testing.T, s *Store, hash string) {
			if err := os.Remove(chunkFile(t, s, hash)); err != nil {
				t.Fatal(err)
			}
		}, "missing", true},
	}
	// Chunk 1 of the pages is stored raw (random), shuffled (a field) or
	// compressed (text): each is checked its own way (decodeChunk).
	contents := map[string][]byte{
		"raw":        randBytes(21, 2*MaxChunk+1),
		"shuffled":   memLike(21, 2*MaxChunk+1),
		"compressed": memLike(21, 3*MaxChunk+1)[MaxChunk:],
	}
	for _, tc := range tests {
		for kind, pages := range contents {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				s := newStore(t)
				src := t.TempDir()
				files := map[string][]byte{"core-1.img": randBytes(20, 5000), "pages-1.img": pages}
				_, m := commit(t, s, writeSpecs(t, src, files), nil)
				var f File
				for _, f = range m.Files {
					if f.Name == "pages-1.img" {
						break
					}
				}
				bad := f.Chunks[1]
				z := blobBytes(t, s, bad.Hash)
				if shuffled := bytes.HasPrefix(z, filterHeader[:]); shuffled != (kind == "shuffled") || bad.Check != fileCheck(z) {
					t.Fatalf("%s chunk: shuffled %v, Check %q", kind, shuffled, bad.Check)
				}
				pack := chunkFile(t, s, bad.Hash)
				tc.damage(t, s, bad.Hash)
				if tc.quickSees {
					pack = filepath.Join(s.Dir, "packs") // no pack holds it now
				}

				ps := s.Verify(context.Background(), m)
				if len(ps) != 1 {
					t.Fatalf("Verify found %d problems, want 1: %v", len(ps), ps)
				}
				p := ps[0]
				if p.File != "pages-1.img" || p.Chunk != 1 || p.Offset != MaxChunk || p.Hash != bad.Hash ||
					!strings.HasPrefix(p.Path, pack) || !strings.Contains(p.Reason, tc.reason) {
					t.Errorf("Verify problem %+v: want pages-1.img, chunk 1 at %d, %s, reason with %q", p, MaxChunk, pack, tc.reason)
				}
				msg := p.String()
				if !strings.Contains(msg, "pages-1.img") || !strings.Contains(msg, "chunk 1") || !strings.Contains(msg, bad.Hash) {
					t.Errorf("problem text %q should name the file, the chunk and its path", msg)
				}
				if got := len(s.Quick(m)) > 0; got != tc.quickSees {
					t.Errorf("Quick saw the damage: %v, want %v", got, tc.quickSees)
				}

				out := t.TempDir()
				err := s.Materialize(context.Background(), m, out)
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("Materialize of a damaged generation: err = %v, want ErrCorrupt", err)
				}
				var ce *CorruptError
				if !errors.As(err, &ce) || len(ce.Problems) != 1 || ce.Generation != m.Generation {
					t.Fatalf("Materialize error %#v is not a CorruptError with one problem", err)
				}
				for _, want := range []string{"generation 1", "pages-1.img", "chunk 1", bad.Hash} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("Materialize error %q does not name %q", err, want)
					}
				}
			})
		}
	}
}

func TestCorruptErrorCountsProblems(t *testing.T) {
	e := &CorruptError{Generation: 3, Problems: []Problem{{File: "a", Chunk: -1, Reason: "x"}, {File: "b", Chunk: -1, Reason: "y"}, {File: "c", Chunk: -1, Reason: "z"}}}
	if got := e.Error(); !strings.Contains(got, "generation 3") || !strings.Contains(got, "a: x") || !strings.Contains(got, "2 more problems") {
		t.Errorf("CorruptError = %q", got)
	}
}

func TestManifestDamage(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, s *Store, path string)
		gen    int // generation to read
		want   string
	}{
		{"truncated", func(t *testing.T, _ *Store, p string) {
			b := readFile(t, p)
			writeFile(t, p, b[:len(b)/2])
		}, 1, "not valid JSON"},
		{"empty", func(t *testing.T, _ *Store, p string) { writeFile(t, p, nil) }, 1, "not valid JSON"},
		{"edited field", func(t *testing.T, _ *Store, p string) {
			b := strings.Replace(string(readFile(t, p)), `"root_pid":4242`, `"root_pid":4243`, 1)
			writeFile(t, p, []byte(b))
		}, 1, "does not match its checksum"},
		{"edited chunk list", func(t *testing.T, _ *Store, p string) {
			// Swap two chunk hashes and re-seal: the checksum holds, the
			// file digest does not.
			s := string(readFile(t, p))
			m, err := parseManifest([]byte(s))
			if err != nil {
				t.Fatal(err)
			}
			c := m.Files[0].Chunks
			c[0], c[1] = c[1], c[0]
			b, err := m.seal()
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, p, b)
		}, 1, "chunk list does not match its digest"},
		{"missing", func(t *testing.T, _ *Store, p string) {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}, 1, "is missing"},
		{"moved to another generation", func(t *testing.T, s *Store, p string) {
			mkdir(t, s.GenDir(5))
			writeFile(t, filepath.Join(s.GenDir(5), "manifest.json"), readFile(t, p))
		}, 5, "names generation 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			_, _ = commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": randBytes(30, MaxChunk+10)}), func(m *Manifest) {
				m.Job.RootPID = 4242
			})
			p := filepath.Join(s.GenDir(1), "manifest.json")
			tc.damage(t, s, p)
			_, err := s.ReadManifest(tc.gen)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("ReadManifest: err = %v, want ErrCorrupt", err)
			}
			path := filepath.Join(s.GenDir(tc.gen), "manifest.json")
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("ReadManifest error %q should name %s and say %q", err, path, tc.want)
			}
		})
	}
}

func TestReadManifestNoGeneration(t *testing.T) {
	s := newStore(t)
	if _, err := s.ReadManifest(3); !errors.Is(err, ErrNoGeneration) {
		t.Errorf("ReadManifest of a generation that never existed: %v, want ErrNoGeneration", err)
	}
}

func TestGenerationsIgnoresOthers(t *testing.T) {
	s := newStore(t)
	for _, d := range []string{"checkpoints/3", "checkpoints/12", "checkpoints/0", "checkpoints/-1", "checkpoints/x", "staging/gen-1", "staging/4"} {
		mkdir(t, filepath.Join(s.Dir, d))
	}
	writeFile(t, filepath.Join(s.Dir, "checkpoints", "9"), nil) // a file, not a generation
	gens, err := s.Generations()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gens, []int{3, 12}) {
		t.Errorf("Generations = %v, want [3 12]", gens)
	}
}

func TestGC(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	shared, only1, only2 := randBytes(40, 1000), randBytes(41, 1000), randBytes(42, 1000)
	g1, m1 := commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": shared, "b.img": only1}), nil)
	g2, m2 := commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": shared, "b.img": only2}), nil)
	// Debris of a killed writer, and a chunk nobody references.
	tmp := filepath.Join(s.Dir, "packs", "abcdef0123456789.tmp")
	writeFile(t, tmp, []byte("half a pack"))
	orphan := orphanPack(t, s, "cd")

	res, err := s.GC()
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 1 || res.Kept != 3 || res.PacksRemoved != 1 {
		t.Errorf("GC removed %d chunks in %d packs and kept %d, want the orphan removed, 3 kept", res.Chunks, res.PacksRemoved, res.Kept)
	}
	for _, p := range []string{tmp, orphan} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("GC left %s", p)
		}
	}

	if err := s.Remove(g1); err != nil {
		t.Fatal(err)
	}
	if gens, _ := s.Generations(); !slices.Equal(gens, []int{g2}) {
		t.Errorf("after Remove(%d): generations %v", g1, gens)
	}
	res, err = s.GC()
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 1 || res.Kept != 2 {
		t.Errorf("GC after removing generation 1 removed %d, kept %d; want 1 and 2", res.Chunks, res.Kept)
	}
	only1Pack := filepath.Join(s.Dir, "packs") // set below if still there
	if ps, _ := s.Packs(); len(ps) > 0 {
		for _, p := range ps {
			for _, r := range p.Records {
				if r.Hash == chunkOf(m1, "b.img").Hash {
					only1Pack = p.Path
				}
			}
		}
	}
	if only1Pack != filepath.Join(s.Dir, "packs") {
		t.Errorf("the chunk only generation 1 used is still there, in %s", only1Pack)
	}
	if ps := s.Verify(context.Background(), m2); len(ps) != 0 {
		t.Errorf("generation 2 damaged by GC: %v", ps)
	}
}

func TestGCRefusesUnreadableManifest(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": randBytes(50, 100)}), nil)
	commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": randBytes(51, 100)}), nil)
	orphanPack(t, s, "ef")
	p := filepath.Join(s.GenDir(2), "manifest.json")
	writeFile(t, p, readFile(t, p)[:20])
	before := countChunks(t, s)

	_, err := s.GC()
	if err == nil || !strings.Contains(err.Error(), "generation 2") {
		t.Fatalf("GC with an unreadable manifest: err = %v, want a refusal naming generation 2", err)
	}
	if n := countChunks(t, s); n != before {
		t.Errorf("GC removed %d chunks although it refused", before-n)
	}
}

func TestRetain(t *testing.T) {
	tests := []struct {
		keep        int
		wantRemoved []int
		wantLeft    []int
	}{
		{0, nil, []int{1, 2, 3, 4}},
		{2, []int{1, 2}, []int{3, 4}},
		{4, nil, []int{1, 2, 3, 4}},
		{9, nil, []int{1, 2, 3, 4}},
		{1, []int{1, 2, 3}, []int{4}},
	}
	for _, tc := range tests {
		s := newStore(t)
		src := t.TempDir()
		var last *Manifest
		for i := range 4 {
			_, last = commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": randBytes(int64(60+i), 2000)}), nil)
		}
		removed, err := s.Retain(tc.keep)
		if err != nil {
			t.Fatal(err)
		}
		gens, _ := s.Generations()
		if !slices.Equal(removed, tc.wantRemoved) || !slices.Equal(gens, tc.wantLeft) {
			t.Errorf("Retain(%d) removed %v, left %v; want %v, %v", tc.keep, removed, gens, tc.wantRemoved, tc.wantLeft)
		}
		// Chunks of removed generations are collected.
		if n := countChunks(t, s); n != len(tc.wantLeft) {
			t.Errorf("Retain(%d) left %d chunks, want %d", tc.keep, n, len(tc.wantLeft))
		}
		if ps := s.Verify(context.Background(), last); len(ps) != 0 {
			t.Errorf("Retain(%d) damaged the newest generation: %v", tc.keep, ps)
		}
		if ents, _ := os.ReadDir(filepath.Join(s.Dir, "staging")); len(ents) != 0 {
			t.Errorf("Retain left %v in staging", names(ents))
		}
	}
}

func TestLock(t *testing.T) {
	tests := []struct {
		name         string
		first, other bool // exclusive?
		wantLocked   bool
	}{
		{"exclusive blocks exclusive", true, true, true},
		{"exclusive blocks shared", true, false, true},
		{"shared blocks exclusive", false, true, true},
		{"shared admits shared", false, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			unlock, err := s.Lock(context.Background(), tc.first)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			defer cancel()
			start := time.Now()
			unlock2, err := s.Lock(ctx, tc.other)
			if tc.wantLocked {
				if !errors.Is(err, ErrLocked) {
					t.Fatalf("second lock: err = %v, want ErrLocked", err)
				}
				if !strings.Contains(err.Error(), s.Dir) {
					t.Errorf("ErrLocked %q should name the store", err)
				}
				if d := time.Since(start); d < 100*time.Millisecond {
					t.Errorf("gave up after %v, before the deadline", d)
				}
			} else if err != nil {
				t.Fatalf("second shared lock: %v", err)
			} else {
				unlock2()
			}
			unlock()
			// Released: the same request now succeeds at once.
			unlock3, err := s.Lock(context.Background(), tc.other)
			if err != nil {
				t.Fatalf("lock after release: %v", err)
			}
			unlock3()
		})
	}
}

func TestLockWaitsForRelease(t *testing.T) {
	s := newStore(t)
	unlock, err := s.Lock(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(100*time.Millisecond, unlock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	unlock2, err := s.Lock(ctx, true)
	if err != nil {
		t.Fatalf("lock released after 100ms was not taken: %v", err)
	}
	unlock2()
}

func TestCleanStagingAndAbort(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	commit(t, s, writeSpecs(t, src, map[string][]byte{"a.img": randBytes(70, 100)}), nil)
	// A killed writer left a staging directory that even holds a manifest.
	junk := filepath.Join(s.Dir, "staging", "gen-123")
	mkdir(t, filepath.Join(junk, "images"))
	writeFile(t, filepath.Join(junk, "images", "pages-1.img"), []byte("half"))
	writeFile(t, filepath.Join(junk, "manifest.json"), []byte(`{"format":1}`))
	writeFile(t, filepath.Join(s.Dir, "staging", "removing-1"), nil)

	if gens, _ := s.Generations(); !slices.Equal(gens, []int{1}) {
		t.Errorf("staging debris listed as a generation: %v", gens)
	}
	n, err := s.CleanStaging()
	if err != nil || n != 2 {
		t.Errorf("CleanStaging = %d, %v; want 2 entries removed", n, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.Dir, "staging")); len(ents) != 0 {
		t.Errorf("staging still holds %v", names(ents))
	}
	if _, err := s.ReadManifest(1); err != nil {
		t.Errorf("CleanStaging damaged generation 1: %v", err)
	}

	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), writeSpecs(t, src, map[string][]byte{"b.img": randBytes(71, 100)})); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.Dir, "staging")); len(ents) != 0 {
		t.Errorf("Abort left %v in staging", names(ents))
	}
	if gens, _ := s.Generations(); !slices.Equal(gens, []int{1}) {
		t.Errorf("aborted writer committed something: generations %v", gens)
	}
}

func TestAddFilesMissingSource(t *testing.T) {
	s := newStore(t)
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	err = w.AddFiles(context.Background(), []FileSpec{{Path: filepath.Join(t.TempDir(), "nope"), Name: "nope", Kind: "image"}})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("AddFiles of a missing file: %v", err)
	}
}

// helpers

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Create(filepath.Join(t.TempDir(), "store"), "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	s.PackLimit = 1 // a pack per record (helpers_test.go)
	return s
}

// writeSpecs writes files under dir and returns image specs for them,
// sorted by name.
func writeSpecs(t *testing.T, dir string, files map[string][]byte) []FileSpec {
	t.Helper()
	var specs []FileSpec
	for name, b := range files {
		p := filepath.Join(dir, name)
		mkdir(t, filepath.Dir(p))
		writeFile(t, p, b)
		kind := "image"
		if strings.HasPrefix(filepath.Base(name), "pages-") {
			kind = "pages"
		}
		specs = append(specs, FileSpec{Path: p, Name: name, Kind: kind})
	}
	slices.SortFunc(specs, func(a, b FileSpec) int { return strings.Compare(a.Name, b.Name) })
	return specs
}

// commit stores specs as a new generation; edit may fill in the manifest.
func commit(t *testing.T, s *Store, specs []FileSpec, edit func(*Manifest)) (int, *Manifest) {
	t.Helper()
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
	m := &Manifest{}
	if edit != nil {
		edit(m)
	}
	gen, err := w.Commit(m)
	if err != nil {
		t.Fatal(err)
	}
	return gen, m
}

func chunkOf(m *Manifest, name string) Chunk {
	for _, f := range m.Files {
		if f.Name == name {
			return f.Chunks[0]
		}
	}
	return Chunk{}
}

// randBytes is n bytes of incompressible, seed-determined data.
func randBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x >> 32)
	}
	return b
}

// memLike is n bytes that take turns, chunk by chunk, at the kinds of
// memory a job holds, so that every way of storing a chunk is used:
// random bytes (stored raw), a float64 field (shuffled, compressed) and
// log text (compressed). seed varies all three.
func memLike(seed int64, n int) []byte {
	b := make([]byte, 0, n+MaxChunk)
	for k := 0; len(b) < n; k++ {
		end := len(b) + MaxChunk
		switch k % 3 {
		case 0:
			b = append(b, randBytes(seed+int64(k), MaxChunk)...)
		case 1:
			for i := 0; len(b) < end; i++ {
				x := float64(int(seed)*1000+k*MaxChunk/8+i) / (1 << 18)
				v := math.Round((293.15+4*math.Sin(2*math.Pi*x))*1024) / 1024
				b = binary.LittleEndian.AppendUint64(b, math.Float64bits(v))
			}
		case 2:
			for line := int(seed)*100000 + k*20000; len(b) < end; line++ {
				b = fmt.Appendf(b, "step=%d cell=%d T=%.3f status=OK\n", line/4096, line, 293.15+float64(line%977)/1000)
			}
		}
		b = b[:end]
	}
	return b[:n]
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Error(err)
		return
	}
	if got := st.Mode() & (os.ModeDir | os.ModePerm); got != want {
		t.Errorf("%s: mode %v, want %v", path, got, want)
	}
}

func names(ents []os.DirEntry) []string {
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func mkdir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o600); err != nil {
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
