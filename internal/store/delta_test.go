package store

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// commitPages stores mem as one streamed pages image (chunks at addresses,
// as the page server puts them) and returns the manifest.
func commitPages(t *testing.T, s *Store, mem []byte) *Manifest {
	t.Helper()
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	fw := w.Begin("pages-1.img", "pages", 0o600)
	const base = 0x7f0000000000
	for off := 0; off < len(mem); off += MaxChunk {
		b := append(w.Buffer(), mem[off:min(off+MaxChunk, len(mem))]...)
		if err := fw.PutAt(b, uint64(base+off)); err != nil {
			t.Fatal(err)
		}
	}
	m := &Manifest{}
	if _, err := w.Commit(m); err != nil {
		t.Fatal(err)
	}
	return m
}

func checkRestores(t *testing.T, s *Store, m *Manifest, want []byte) {
	t.Helper()
	out := t.TempDir()
	if err := s.Materialize(context.Background(), m, out); err != nil {
		t.Fatalf("generation %d: %v", m.Generation, err)
	}
	if got := readFile(t, filepath.Join(out, "pages-1.img")); !bytes.Equal(got, want) {
		t.Fatalf("generation %d restores other content", m.Generation)
	}
	if ps := s.Verify(context.Background(), m); len(ps) > 0 {
		t.Fatalf("generation %d: Verify: %v", m.Generation, ps)
	}
}

// TestPageDeltas: a generation after a scattered change of a few pages
// stores about those pages (deltas on the previous full chunks, a zero
// chunk included), deltas stay on full bases (K=2) and hold every page
// that differs from the base, a chunk changed in more than half of its
// pages is stored whole again, and every generation restores and verifies
// exactly, also after the generation holding the bases is removed and
// collected. No soft-dirty tracking is used: the pages that changed are
// found by comparing with the base.
func TestPageDeltas(t *testing.T) {
	s := newStore(t)
	s.PackLimit = 0
	mem := memLike(7, 8*MaxChunk)
	clear(mem[5*MaxChunk : 6*MaxChunk]) // a zero chunk
	m1 := commitPages(t, s, mem)
	if m1.Stats.DeltaChunks != 0 {
		t.Errorf("generation 1 has %d deltas", m1.Stats.DeltaChunks)
	}
	checkRestores(t, s, m1, mem)

	r := rand.New(rand.NewPCG(1, 2))
	touch := func(n int) {
		for range n {
			p := r.IntN(len(mem) / PageSize)
			mem[p*PageSize+r.IntN(PageSize)] ^= 0x5a
		}
	}
	// Generation 2: one word in each of 10 pages, and one in the zero chunk.
	touch(10)
	mem[5*MaxChunk+123] = 9
	m2 := commitPages(t, s, mem)
	if m2.Stats.DeltaChunks == 0 || m2.Stats.NewBytes > 16*PageSize {
		t.Errorf("generation 2 after 11 changed pages: %d deltas, %d new bytes", m2.Stats.DeltaChunks, m2.Stats.NewBytes)
	}
	checkRestores(t, s, m2, mem)

	// Generation 3: more pages; deltas are still on generation 1's chunks.
	touch(10)
	m3 := commitPages(t, s, mem)
	checkRestores(t, s, m3, mem)
	ps, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	kind := map[string]string{}
	for _, p := range ps {
		for _, rec := range p.Records {
			kind[rec.Hash] = rec.Kind
		}
	}
	for _, p := range ps {
		for _, rec := range p.Records {
			if rec.Kind == "delta" && rec.Base != "zero" && kind[rec.Base] != "chunk" {
				t.Errorf("delta %.12s is on %.12s, a %q: more than 2 objects to read", rec.Hash, rec.Base, kind[rec.Base])
			}
		}
	}

	// Generation 4: chunk 2 changes in most of its pages: whole again.
	for p := 0; p < 200; p++ {
		mem[2*MaxChunk+p*PageSize] ^= 1
	}
	m4 := commitPages(t, s, mem)
	checkRestores(t, s, m4, mem)
	if c := m4.Files[0].Chunks[2]; kind[c.Hash] != "" {
		t.Fatalf("chunk 2 of generation 4 was there before")
	} else if ps, _ := s.Packs(); !hasRecord(ps, c.Hash, "chunk") {
		t.Errorf("chunk 2 of generation 4, changed in 200 of 256 pages, is not stored whole")
	}

	// Remove generations 1 and 2: the bases stay, for 3 and 4.
	for _, g := range []int{1, 2} {
		if err := s.Remove(g); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.GCWith(GCOptions{Repack: true}); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(s.Dir)
	if err != nil {
		t.Fatal(err)
	}
	checkRestores(t, s2, m4, mem)
}

func hasRecord(ps []PackInfo, hash, kind string) bool {
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Hash == hash && r.Kind == kind {
				return true
			}
		}
	}
	return false
}

// TestDeltaRoundTrip: encodeDelta and applyDelta agree for short last
// pages, and a payload that does not fit its bitmap is refused.
func TestDeltaRoundTrip(t *testing.T) {
	for _, n := range []int{1, PageSize - 1, PageSize, 3*PageSize + 17, MaxChunk} {
		base := randBytes(int64(n), n)
		b := append([]byte(nil), base...)
		var pages []int
		for p := 0; p < pagesOf(n); p += 3 {
			b[p*PageSize] ^= 0xff
			pages = append(pages, p)
		}
		d := encodeDelta(nil, b, pages)
		out := append([]byte(nil), base...)
		if err := applyDelta(out, d); err != nil || !bytes.Equal(out, b) {
			t.Errorf("%d bytes: %v, equal %v", n, err, bytes.Equal(out, b))
		}
		if err := applyDelta(out, d[:len(d)-1]); err == nil {
			t.Errorf("%d bytes: a short delta applied", n)
		}
		if err := applyDelta(out, append(d, 0)); err == nil {
			t.Errorf("%d bytes: a long delta applied", n)
		}
	}
}

// TestNoSoftDirtyFallback: DirtyTracking agrees with the kernel's own
// configuration (this kernel is built without CONFIG_MEM_SOFT_DIRTY, so
// the increments above came from page digests alone), and a probe that
// cannot read a pagemap says no.
func TestNoSoftDirtyFallback(t *testing.T) {
	got := DirtyTracking()
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		t.Skipf("no /proc/config.gz to compare with; DirtyTracking = %q", got)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	want := ""
	if bytes.Contains(cfg, []byte("\nCONFIG_MEM_SOFT_DIRTY=y\n")) {
		want = "soft-dirty"
	}
	if got != want {
		t.Errorf("DirtyTracking = %q; the kernel's config says %q", got, want)
	}
	if probeSoftDirty("/nonexistent") {
		t.Error("a soft-dirty probe without a pagemap said yes")
	}
}
