package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
)

// sumPages commits one file of memLike pages (raw, shuffled, text chunks)
// and returns the store, the manifest and the pages.
func checkPages(t *testing.T, seed int64) (*Store, *Manifest, []byte) {
	t.Helper()
	s := newStore(t)
	pages := memLike(seed, 3*MaxChunk)
	_, m := commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": pages}), nil)
	return s, m, pages
}

// TestCheckRecorded: every stored chunk records the Check of its file's
// bytes (raw, shuffled and compressed alike), and a second generation of
// the same content reuses the record without rewriting anything.
func TestCheckRecorded(t *testing.T) {
	s, m, pages := checkPages(t, 1)
	for i, c := range m.Files[0].Chunks {
		z := blobBytes(t, s, c.Hash)
		if !validCheck(c.Check) || c.Check != fileCheck(z) {
			t.Errorf("chunk %d: Check %q, its file checks to %s", i, c.Check, fileCheck(z))
		}
	}
	_, m2 := commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": pages}), nil)
	if m2.Stats.NewChunks != 0 {
		t.Errorf("unchanged content added %d chunks", m2.Stats.NewChunks)
	}
	for i, c := range m2.Files[0].Chunks {
		if c != m.Files[0].Chunks[i] {
			t.Errorf("chunk %d: second generation recorded %+v, first %+v", i, c, m.Files[0].Chunks[i])
		}
	}
}

// TestReencodedChunkReads: a chunk file holding another valid encoding of
// the right content (as another cryo version would write it) does not
// match its Check but still reads, by its content's hash, and verifies.
func TestReencodedChunkReads(t *testing.T) {
	s, m, pages := checkPages(t, 2)
	c := m.Files[0].Chunks[1]
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	plain := cd.enc.EncodeAll(pages[MaxChunk:2*MaxChunk], nil) // unshuffled: other bytes
	if fileCheck(plain) == c.Check {
		t.Fatal("the re-encoding is the same file")
	}
	replaceBlob(t, s, c.Hash, plain)
	out := t.TempDir()
	if err := s.Materialize(context.Background(), m, out); err != nil {
		t.Fatalf("re-encoded chunk: %v", err)
	}
	if !bytes.Equal(readFile(t, filepath.Join(out, "pages-1.img")), pages) {
		t.Error("materialized pages differ")
	}
	if ps := s.Verify(context.Background(), m); len(ps) != 0 {
		t.Errorf("Verify: %v", ps)
	}
}

// TestVerifyHashesContent: Verify does not stop at a chunk file that
// matches its Check; it hashes the content against the chunk's name. Here
// the file and the Check were both replaced (a manifest re-sealed by someone
// else), so that only the content check can tell.
func TestVerifyHashesContent(t *testing.T) {
	s, m, _ := checkPages(t, 3)
	c := &m.Files[0].Chunks[2]
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	other := append([]byte(nil), cd.compress(memLike(99, 3*MaxChunk)[2*MaxChunk:])...)
	replaceBlob(t, s, c.Hash, other)
	c.Check, c.Stored = fileCheck(other), int64(len(other))
	b, err := m.seal()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(s.GenDir(m.Generation), "manifest.json"), b)
	m, err = s.ReadManifest(m.Generation)
	if err != nil {
		t.Fatal(err)
	}
	ps := s.Verify(context.Background(), m)
	if len(ps) != 1 || ps[0].Chunk != 2 || !strings.Contains(ps[0].Reason, "does not match its name") {
		t.Errorf("Verify: %v, want chunk 2 whose content does not match", ps)
	}
}

// TestLeftoverPack: the packs of a checkpoint that never committed (its
// writer was aborted, or killed after its packs were durable) are reused
// by the next generation, which then adds nothing, and it reads.
func TestLeftoverPack(t *testing.T) {
	pages := memLike(4, 3*MaxChunk)
	s := newStore(t)
	specs := writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": pages})
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
	if err := w.pw.finish(); err != nil { // the packs are durable; then cryo dies
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	left := countChunks(t, s)
	if left == 0 {
		t.Fatal("the aborted writer left no finished pack")
	}
	_, m := commit(t, s, specs, nil)
	if m.Stats.NewChunks != 0 || countChunks(t, s) != left {
		t.Errorf("%d new chunks, %d in the store after %d left; want the left ones reused", m.Stats.NewChunks, countChunks(t, s), left)
	}
	out := t.TempDir()
	if err := s.Materialize(context.Background(), m, out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, filepath.Join(out, "pages-1.img")), pages) {
		t.Error("materialized pages differ")
	}
}

// TestDamagedFrames: 3000 random bit flips and truncations of chunk files
// of every kind (raw, shuffled, compressed): decoding never yields more
// than a chunk, and a read, which trusts Check, never returns wrong content
// without an error.
func TestDamagedFrames(t *testing.T) {
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	type frame struct {
		c Chunk
		z []byte
	}
	var frames []frame
	for _, b := range [][]byte{randBytes(1, MaxChunk/4), memLike(1, 2*MaxChunk)[MaxChunk:], memLike(1, 3*MaxChunk)[2*MaxChunk:]} {
		z := append([]byte(nil), cd.compress(b)...)
		sum := sha256.Sum256(b)
		c := Chunk{Hash: hex.EncodeToString(sum[:]), Len: int64(len(b)), Stored: int64(len(z)), Check: fileCheck(z)}
		// Format-2 names: the SHA-256 of the content (verifier(1)).
		frames = append(frames, frame{c, z})
	}
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 3000 {
		f := frames[i%len(frames)]
		z := append([]byte(nil), f.z...)
		if i%4 == 3 {
			z = z[:r.IntN(len(z))]
		} else {
			for range 1 + r.IntN(3) {
				z[r.IntN(len(z))] ^= 1 << r.IntN(8)
			}
		}
		if data, err := decodeFrame(z, nil); err == nil && len(data) > MaxChunk {
			t.Fatalf("damage %d: decoded %d bytes", i, len(data))
		}
		data, err := decodeChunk(z, f.c, nil, false, (&Store{}).verifier(1))
		if err == nil {
			if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != f.c.Hash {
				t.Fatalf("damage %d to a chunk of kind %d: read returned wrong content without an error", i, i%len(frames))
			}
		}
	}
}
