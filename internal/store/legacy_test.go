package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// legacyStore writes a store as cryo wrote them before packs: store
// format 1, a file per chunk under chunks/, a manifest of format 2 whose
// chunks are named by the SHA-256 of their content. It returns the store
// and the file's content.
func legacyStore(t *testing.T) (string, []byte) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "store")
	for _, d := range []string{"chunks", "checkpoints/1", "staging", "logs"} {
		mkdir(t, filepath.Join(dir, d))
	}
	writeFile(t, filepath.Join(dir, metaName), []byte(`{"format":1,"created_by":"cryo 0.9","created":"2026-01-01T00:00:00Z"}`))
	data := memLike(11, 3*MaxChunk)
	clear(data[MaxChunk : 2*MaxChunk]) // a zero chunk
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	f := File{Name: "pages-1.img", Kind: "pages", Mode: 0o600}
	for off := 0; off < len(data); off += MaxChunk {
		b := data[off : off+MaxChunk]
		sum := sha256.Sum256(b)
		c := Chunk{Hash: hex.EncodeToString(sum[:]), Len: MaxChunk}
		if isZero(b) {
			c.Zero = true
		} else {
			z := cd.compress(b)
			c.Stored, c.Check = int64(len(z)), fileCheck(z)
			mkdir(t, filepath.Join(dir, "chunks", c.Hash[:2]))
			writeFile(t, filepath.Join(dir, "chunks", c.Hash[:2], c.Hash), z)
		}
		f.Chunks = append(f.Chunks, c)
		f.Size += c.Len
	}
	f.Digest = fileDigest(f.Chunks)
	m := &Manifest{Format: 2, Generation: 1, Files: []File{f}}
	b, err := m.seal()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "checkpoints", "1", "manifest.json"), b)
	return dir, data
}

// TestLegacyStoreReadsAndConverts: a store of format 1 with a manifest of
// format 2 reads and verifies as it is; the next generation upgrades it to
// format 2 (packs) and both read; `gc --repack` packs its chunk files,
// after which nothing is left under chunks/ and every generation still
// restores exactly.
func TestLegacyStoreReadsAndConverts(t *testing.T) {
	dir, data := legacyStore(t)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.Format() != 1 {
		t.Fatalf("format %d", s.Format())
	}
	m1, err := s.ReadManifest(1)
	if err != nil {
		t.Fatal(err)
	}
	check := func(s *Store, m *Manifest, want []byte) {
		t.Helper()
		if ps := s.Quick(m); len(ps) > 0 {
			t.Errorf("generation %d: Quick: %v", m.Generation, ps)
		}
		if ps := s.Verify(context.Background(), m); len(ps) > 0 {
			t.Errorf("generation %d: Verify: %v", m.Generation, ps)
		}
		out := t.TempDir()
		if err := s.Materialize(context.Background(), m, out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readFile(t, filepath.Join(out, m.Files[0].Name)), want) {
			t.Errorf("generation %d restores other content", m.Generation)
		}
	}
	check(s, m1, data)

	// A new generation: the store becomes format 2 and gets a key.
	data2 := append([]byte(nil), data...)
	data2[5] ^= 1
	_, m2 := commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": data2}), nil)
	var meta storeMeta
	if err := json.Unmarshal(readFile(t, filepath.Join(dir, metaName)), &meta); err != nil || meta.Format != 2 || len(meta.Key) != 64 {
		t.Errorf("after a new generation, cryo-store.json is %+v (%v)", meta, err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	check(s2, m1, data)
	check(s2, m2, data2)

	res, err := s2.GCWith(GCOptions{Repack: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.ChunkFiles != 2 {
		t.Errorf("repack packed %d chunk files, want 2: %+v", res.ChunkFiles, res)
	}
	left := 0
	_ = filepath.Walk(filepath.Join(dir, "chunks"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			left++
		}
		return nil
	})
	if left != 0 {
		t.Errorf("%d chunk files left after the repack", left)
	}
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	check(s3, m1, data)
	check(s3, m2, data2)
	// And GC keeps what they need.
	if _, err := s3.GC(); err != nil {
		t.Fatal(err)
	}
	check(s3, m1, data)
}
