package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestPackWrite: records of every length and alignment come back from a
// pack exactly as appended, read by offset after the store is opened anew
// (so from the pack's own index), written directly where the file system
// takes O_DIRECT (here, and on /dev/shm when it exists) and through the
// page cache where it does not; with a small pack limit they spread over
// several packs, each finished whole.
func TestPackWrite(t *testing.T) {
	dirs := []string{t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "cryo-direct-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dirs = append(dirs, d)
	}
	for _, dir := range dirs {
		for _, limit := range []int64{0, 3 << 20} {
			s, err := Create(filepath.Join(dir, "store-"+string(rune('a'+limit%7))), "test")
			if err != nil {
				t.Fatal(err)
			}
			s.PackLimit = limit
			pw := s.newPackWriter()
			want := map[[32]byte][]byte{}
			for i, n := range []int{1, directAlign - 1, directAlign, directAlign + 1, 300_001, MaxChunk, MaxChunk + 77, 5, maxStored, MaxChunk, 3} {
				z := randBytes(int64(n), n)
				var h [32]byte
				h[0], h[1] = byte(i), 0xa5
				if _, err := pw.append(record{kind: kindFull, hash: h, n: uint32(min(n, MaxChunk))}, z); err != nil {
					t.Fatal(err)
				}
				want[h] = z
			}
			if err := pw.finish(); err != nil {
				t.Fatal(err)
			}
			s2, err := Open(s.Dir)
			if err != nil {
				t.Fatal(err)
			}
			ix, err := s2.index()
			if err != nil {
				t.Fatal(err)
			}
			if packs := len(ix.list()); limit == 0 && packs != 1 || limit > 0 && packs < 2 {
				t.Errorf("%s, limit %d: %d packs", dir, limit, packs)
			}
			for h, z := range want {
				locs := ix.lookup(h)
				if len(locs) != 1 {
					t.Fatalf("%s: record %x: %d copies", dir, h[:2], len(locs))
				}
				err := s2.readBlob(locs[0], func(got []byte) error {
					if !bytes.Equal(got, z) {
						t.Errorf("%s, limit %d: record of %d bytes read back as %d different bytes", dir, limit, len(z), len(got))
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			ents, _ := os.ReadDir(filepath.Join(s.Dir, "packs"))
			for _, e := range ents {
				if isPackTemp(e.Name()) {
					t.Errorf("%s: unfinished pack %s left", dir, e.Name())
				}
			}
		}
	}
}
