package store

import (
	"encoding/hex"
	"os"
	"testing"
)

// Unit tests make stores whose packs hold one record each (PackLimit 1),
// so that a chunk's pack can stand for its file: damaging, cutting or
// removing it hits that chunk alone.

// recordOf finds the chunk (or delta) record of hash.
func recordOf(t *testing.T, s *Store, hash string) (PackInfo, PackRecord) {
	t.Helper()
	ps, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Hash == hash && r.Kind != "digests" {
				return p, r
			}
		}
	}
	t.Fatalf("no pack holds chunk %s", hash)
	return PackInfo{}, PackRecord{}
}

// chunkFile is the pack that holds the chunk named hash.
func chunkFile(t *testing.T, s *Store, hash string) string {
	t.Helper()
	p, _ := recordOf(t, s, hash)
	return p.Path
}

// blobBytes is the stored blob of the chunk named hash.
func blobBytes(t *testing.T, s *Store, hash string) []byte {
	t.Helper()
	p, r := recordOf(t, s, hash)
	b := readFile(t, p.Path)
	return b[r.Offset+recHeader : r.Offset+r.Len]
}

// replaceBlob makes z the only stored blob of the chunk named hash (as
// another cryo, or someone else, might have written it).
func replaceBlob(t *testing.T, s *Store, hash string, z []byte) {
	t.Helper()
	p, _ := recordOf(t, s, hash)
	hb, _ := hex.DecodeString(hash)
	ix, err := s.index()
	if err != nil {
		t.Fatal(err)
	}
	var old blobLoc
	for _, l := range ix.lookup([32]byte(hb)) {
		old = l
	}
	pw := s.newPackWriter()
	r := old.record
	if _, err := pw.append(r, z); err != nil {
		t.Fatal(err)
	}
	if err := pw.finish(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p.Path); err != nil {
		t.Fatal(err)
	}
	if _, err := s.index(); err != nil {
		t.Fatal(err)
	}
}

// countChunks counts the chunk records (not digest tables) in the packs.
func countChunks(t *testing.T, s *Store) int {
	t.Helper()
	ps, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Kind != "digests" {
				n++
			}
		}
	}
	return n
}

// flipBlob flips a bit in the middle of the stored blob of chunk hash.
func flipBlob(t *testing.T, s *Store, hash string) {
	t.Helper()
	p, r := recordOf(t, s, hash)
	b := readFile(t, p.Path)
	b[r.Offset+recHeader+(r.Len-recHeader)/2] ^= 0x40
	writeFile(t, p.Path, b)
}

// orphanPack writes a pack holding a chunk that no generation uses, named
// by repeating hex, and returns its path.
func orphanPack(t *testing.T, s *Store, hex2 string) string {
	t.Helper()
	var h [32]byte
	b, _ := hex.DecodeString(hex2)
	for i := range h {
		h[i] = b[0]
	}
	pw := s.newPackWriter()
	if _, err := pw.append(record{kind: kindFull, hash: h, n: 6}, []byte("orphan")); err != nil {
		t.Fatal(err)
	}
	if err := pw.finish(); err != nil {
		t.Fatal(err)
	}
	return s.r.pathOf(pw.finished[0].rel())
}
