package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// testdata/format1-store is a store that an older cryo really wrote, not
// one made with today's encoder (legacy_test.go's is): the cryo of commit
// 829f7f2, the last before pack files (store format 1, manifest format 2,
// a chunk file per chunk named by its SHA-256), checkpointed with --kill,
// as root with CRIU 4.2.1, the process that testdata/format1-store.c
// builds: 64 KiB of memory holding a known pattern and no open file.
// (That cryo's page server spoke only CRIU 4.1's header; it was built with
// commit e1e844e's page-server fix alone added, which does not touch the
// store.) format1Files is what that cryo's own Store.Materialize gave
// back for each file of its generation 1: size and SHA-256.
var format1Files = map[string]struct {
	size   int64
	sha256 string
}{
	"pages-1.img":       {86016, "6ed041d1b66845311da5bf353a4928a284a734f3c369a8e4d8212cb60aa27186"},
	"core-16960.img":    {2111, "9ee5c337d4bf32fb55f2722d5817c9f5330a5158fbd1000e5409592b536539b9"},
	"files.img":         {187, "9a5e438092ff2e976c3957016b816a8330e23579df2e1843d988586f596e43bd"},
	"fs-16960.img":      {18, "c0401d918c8adf38895998d840486f9dd9bfd07eaab1c42357737f6818a053dc"},
	"ids-16960.img":     {36, "f78d18dbee7494f51762bf7f7d0fc90d2af549f2e3ef6e31854e109c341eeb9f"},
	"inventory.img":     {86, "711c284b5730b8bfc97dbe34ce00107fc0e3e326362d487be749d06b35097b90"},
	"mm-16960.img":      {455, "63d15e1ce7f9f27b01852352d2c7edeb6a727c4db164a263c146bc38e4e653f7"},
	"pagemap-16960.img": {72, "7dff6fbea5fa2b1d5bbb1c114827dfa64b094b01052a83247da42fc075458bc4"},
	"pstree.img":        {30, "131fe2dd52c65c2d8c4240e32857a7c59a03906cb0c892c6f9e2483f49ddbd93"},
	"seccomp.img":       {12, "957296853c04f6368f4ba65b5e86dc74860fec6d7017e51428e65632052e88dd"},
	"timens-0.img":      {34, "e73ca69062c827a0d03041d1d89687f546f8d9f80f3f5af433c78356e35c5057"},
	"dump.log":          {28891, "760189d3ca90391fc04fe76a36e0020fb7bb280cdb800448d59d437e6e3ed062"},
}

// format1Chunks is how many chunk files the fixture holds.
const format1Chunks = 15

// format1Store copies testdata/format1-store into a directory of the test's
// own, with the modes cryo gives a store (git keeps neither them nor empty
// directories), so that the test may write into it.
func format1Store(t *testing.T) string {
	t.Helper()
	src := filepath.Join("testdata", "format1-store")
	dst := filepath.Join(t.TempDir(), "store")
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), dirMode)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, fileMode)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// checkFormat1 checks that generation 1 of the store at dir is what the
// old cryo wrote: listed, intact under Quick and Verify, and every file
// read back (materialized, streamed as a restore reads it, and by ReadAt)
// as the old cryo read it.
func checkFormat1(t *testing.T, dir string) {
	t.Helper()
	ctx := context.Background()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if gens, err := s.Generations(); err != nil || !slices.Equal(gens, []int{1}) {
		t.Fatalf("Generations = %v, %v; want [1]", gens, err)
	}
	m, err := s.ReadManifest(1)
	if err != nil {
		t.Fatal(err)
	}
	if m.Format != 2 || m.Job.RootPID != 16960 || len(m.Job.Processes) != 1 || m.Job.Processes[0].Comm != "cryofixture" ||
		m.CRIU.Version != "4.2.1" || len(m.Files) != len(format1Files) {
		t.Errorf("manifest: format %d, job %+v, CRIU %+v, %d files", m.Format, m.Job, m.CRIU, len(m.Files))
	}
	if ps := s.Quick(m); len(ps) > 0 {
		t.Errorf("Quick: %v", ps)
	}
	if ps := s.Verify(ctx, m); len(ps) > 0 {
		t.Errorf("Verify: %v", ps)
	}
	same := func(how, name string, b []byte) {
		t.Helper()
		want, ok := format1Files[name]
		sum := sha256.Sum256(b)
		if !ok || int64(len(b)) != want.size || hex.EncodeToString(sum[:]) != want.sha256 {
			t.Errorf("%s %s: %d bytes, SHA-256 %x; the old cryo read %d bytes, %s", how, name, len(b), sum, want.size, want.sha256)
		}
	}
	out := t.TempDir()
	if err := s.Materialize(ctx, m, out, "image", "pages", "log"); err != nil {
		t.Fatal(err)
	}
	src := s.NewSource(m, nil)
	for _, f := range m.Files {
		same("materialized", f.Name, readFile(t, filepath.Join(out, f.Name)))
		if f.Kind != "log" { // a restore streams CRIU's images only
			var buf bytes.Buffer
			if err := src.Send(ctx, f.Name, &buf); err != nil {
				t.Errorf("stream %s: %v", f.Name, err)
			} else {
				same("streamed", f.Name, buf.Bytes())
			}
		}
		b, err := s.ReadAt(m, f.Name, 0, f.Size)
		if err != nil {
			t.Errorf("ReadAt %s: %v", f.Name, err)
		} else {
			same("ReadAt", f.Name, b)
		}
	}
	if err := src.Finish(); err != nil {
		t.Error(err)
	}
	// The job's memory: the pattern its program wrote, text and then
	// xorshift bytes, in one 64 KiB chunk of the pages.
	var pages []byte
	for _, f := range m.Files {
		if f.Name == "pages-1.img" {
			for _, c := range f.Chunks {
				if c.Len == 64<<10 {
					pages, err = s.ReadChunk(m, c)
				}
			}
		}
	}
	if err != nil || len(pages) != 64<<10 {
		t.Fatalf("the job's 64 KiB of memory: %d bytes, %v", len(pages), err)
	}
	tag := []byte("cryo format-1 fixture ")
	x := uint32(2463534242)
	for i, b := range pages {
		want := tag[i%len(tag)]
		if i >= 32<<10 {
			x ^= x << 13
			x ^= x >> 17
			x ^= x << 5
			want = byte(x)
		}
		if b != want {
			t.Fatalf("the job's memory differs at byte %d: %#x, want %#x", i, b, want)
		}
	}
}

// TestFormat1Fixture: today's cryo reads a store an older cryo wrote
// exactly as that cryo did, and `gc --repack` converts it: every chunk file
// goes into a pack, the store becomes format 2, and the generation still
// verifies and reads the same bytes. The fixture itself is never written.
func TestFormat1Fixture(t *testing.T) {
	dir := format1Store(t)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.Format() != 1 {
		t.Fatalf("the fixture's store format is %d, want 1", s.Format())
	}
	checkFormat1(t, dir)

	unlock, err := s.Lock(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.GCWith(GCOptions{Repack: true})
	unlock()
	if err != nil {
		t.Fatal(err)
	}
	if res.ChunkFiles != format1Chunks || res.Damaged != 0 || res.PacksWritten == 0 {
		t.Errorf("repack: %+v; want its %d chunk files packed", res, format1Chunks)
	}
	left := 0
	_ = filepath.WalkDir(filepath.Join(dir, "chunks"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			left++
		}
		return nil
	})
	if left != 0 {
		t.Errorf("%d chunk files left after the repack", left)
	}
	var meta storeMeta
	if err := json.Unmarshal(readFile(t, filepath.Join(dir, metaName)), &meta); err != nil || meta.Format != storeFormat || len(meta.Key) != 64 {
		t.Errorf("after the repack, cryo-store.json is %+v (%v); want format %d with a key", meta, err, storeFormat)
	}
	checkFormat1(t, dir)
	// The manifest is the old cryo's still: converting moves chunks, it
	// does not rewrite generations.
	want := readFile(t, filepath.Join("testdata", "format1-store", "checkpoints", "1", "manifest.json"))
	if got := readFile(t, filepath.Join(dir, "checkpoints", "1", "manifest.json")); !bytes.Equal(got, want) {
		t.Error("the repack rewrote the manifest")
	}
}
