package store

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestPackLimit: with a small Store.PackLimit one generation spreads over
// several packs, and every pack file, index and footer included, stays
// within the limit but one that holds a single record larger than it; the
// generation reads back whole and verifies. GC's repacking of what a
// removed generation left keeps to the same limit.
func TestPackLimit(t *testing.T) {
	for _, limit := range []int64{3 << 20, 700 << 10} {
		s := newStore(t)
		s.PackLimit = limit
		src := t.TempDir()
		first := map[string][]byte{
			"pages-1.img": append(randBytes(1, 7*MaxChunk), memLike(1, 2*MaxChunk)...),
			"core-1.img":  randBytes(2, 40_000),
			"mm-1.img":    bytes.Repeat([]byte("mapping "), 5000),
		}
		for i := range 800 { // small records, where the index counts
			first[fmt.Sprintf("small/%d.img", i)] = randBytes(int64(100+i), 2000)
		}
		commit(t, s, writeSpecs(t, src, first), nil)
		packs := checkPackSizes(t, s, limit)
		if len(packs) < 3 {
			t.Errorf("limit %d: a generation of 10 MiB is in %d packs, want several", limit, len(packs))
		}
		// A second generation, then the first one removed: repacking
		// moves what the second still uses into new packs.
		second := map[string][]byte{
			"pages-1.img": append(randBytes(1, 4*MaxChunk), randBytes(7, 5*MaxChunk)...),
			"core-1.img":  randBytes(3, 40_000),
			"mm-1.img":    first["mm-1.img"],
		}
		gen2, _ := commit(t, s, writeSpecs(t, t.TempDir(), second), nil)
		if err := s.Remove(1); err != nil {
			t.Fatal(err)
		}
		res, err := s.GCWith(GCOptions{Repack: true})
		if err != nil {
			t.Fatal(err)
		}
		if res.PacksWritten == 0 {
			t.Errorf("limit %d: repacking wrote no pack (%+v)", limit, res)
		}
		checkPackSizes(t, s, limit)
		m, err := s.ReadManifest(gen2)
		if err != nil {
			t.Fatal(err)
		}
		if ps := s.Verify(context.Background(), m); len(ps) != 0 {
			t.Errorf("limit %d: Verify after repacking: %v", limit, ps)
		}
		out := t.TempDir()
		if err := s.Materialize(context.Background(), m, out); err != nil {
			t.Fatal(err)
		}
		for name, want := range second {
			if got := readFile(t, filepath.Join(out, name)); !bytes.Equal(got, want) {
				t.Errorf("limit %d: %s read back differs after repacking", limit, name)
			}
		}
	}
}

// checkPackSizes checks each pack of s against limit (see
// Store.PackLimit) and returns them.
func checkPackSizes(t *testing.T, s *Store, limit int64) []PackInfo {
	t.Helper()
	s2, err := Open(s.Dir) // the packs as a reader finds them
	if err != nil {
		t.Fatal(err)
	}
	packs, err := s2.Packs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range packs {
		st, err := os.Stat(p.Path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != p.Size {
			t.Errorf("%s: %d bytes on disk, index says %d", p.Name, st.Size(), p.Size)
		}
		if st.Size() <= limit {
			continue
		}
		if len(p.Records) != 1 {
			t.Errorf("%s: %d bytes in %d records, over the limit of %d", p.Name, st.Size(), len(p.Records), limit)
		} else if alone := p.Records[0].Len + indexEntry + footerLen; alone != st.Size() {
			t.Errorf("%s: %d bytes over the limit of %d for one record of %d", p.Name, st.Size(), limit, p.Records[0].Len)
		}
	}
	return packs
}
