package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// commitJob stores a job's images as a new generation: mem as a streamed
// pages image (chunks at addresses, so the next generation stores changed
// chunks as deltas), core as an image and a log.
func commitJob(t *testing.T, s *Store, mem, core []byte) *Manifest {
	t.Helper()
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	fw := w.Begin("pages-1.img", "pages", 0o600)
	const base = 0x7f0000000000
	for off := 0; off < len(mem); off += MaxChunk {
		if err := fw.PutAt(append(w.Buffer(), mem[off:min(off+MaxChunk, len(mem))]...), uint64(base+off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Begin("core-1.img", "image", 0o600).Put(append(w.Buffer(), core...)); err != nil {
		t.Fatal(err)
	}
	if err := w.Begin("dump.log", "log", 0o600).Put(append(w.Buffer(), "dumped\n"...)); err != nil {
		t.Fatal(err)
	}
	m := &Manifest{Host: "source"}
	if _, err := w.Commit(m); err != nil {
		t.Fatal(err)
	}
	return m
}

// sendGeneration sends generation m of src to im as a transport would:
// the names the standby lacks, their records (copied, as if across the
// network), then the manifest. It returns the names sent.
func sendGeneration(t *testing.T, src *Store, m *Manifest, im *Importer) []string {
	t.Helper()
	names, err := src.GenerationChunks(m)
	if err != nil {
		t.Fatal(err)
	}
	missing, err := im.Missing(names)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range missing {
		if err := src.ExportBlob(n, func(h, b []byte) error {
			return im.Put(slices.Clone(h), slices.Clone(b))
		}); err != nil {
			t.Fatalf("send chunk %s: %v", n, err)
		}
	}
	mb, err := src.ManifestBytes(m.Generation)
	if err != nil {
		t.Fatal(err)
	}
	gen, err := im.Commit(mb)
	if err != nil {
		t.Fatalf("commit generation %d: %v", m.Generation, err)
	}
	if gen != m.Generation {
		t.Fatalf("committed as generation %d, the source's is %d", gen, m.Generation)
	}
	return missing
}

// materialized is every file of generation gen of s, logs included, as
// Materialize writes it.
func materialized(t *testing.T, s *Store, gen int) map[string][]byte {
	t.Helper()
	m, err := s.ReadManifest(gen)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := s.Materialize(context.Background(), m, dir, "image", "pages", "log"); err != nil {
		t.Fatalf("%s generation %d: %v", s.Dir, gen, err)
	}
	files := map[string][]byte{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		files[rel] = readFile(t, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// checkMirror checks that generation gen of dst verifies and is src's:
// the same manifest bytes, the same files.
func checkMirror(t *testing.T, src, dst *Store, gen int) {
	t.Helper()
	m, err := dst.ReadManifest(gen)
	if err != nil {
		t.Fatalf("the standby's generation %d: %v", gen, err)
	}
	if ps := dst.Verify(context.Background(), m); len(ps) > 0 {
		t.Fatalf("the standby's generation %d does not verify: %v", gen, ps)
	}
	if ps := dst.Quick(m); len(ps) > 0 {
		t.Fatalf("the standby's generation %d is not intact: %v", gen, ps)
	}
	a, _ := src.ManifestBytes(gen)
	b, _ := dst.ManifestBytes(gen)
	if !bytes.Equal(a, b) {
		t.Errorf("generation %d: the standby's manifest differs from the source's", gen)
	}
	want, got := materialized(t, src, gen), materialized(t, dst, gen)
	if len(want) != len(got) {
		t.Errorf("generation %d: the standby has %d files, the source %d", gen, len(got), len(want))
	}
	for name, w := range want {
		if !bytes.Equal(got[name], w) {
			t.Errorf("generation %d: %s differs on the standby", gen, name)
		}
	}
}

// twoGenerations is a source store with generation 1 and generation 2,
// which changes a page in each of three chunks (stored as deltas on
// generation 1's chunks) and the core image.
func twoGenerations(t *testing.T) (src *Store, m1, m2 *Manifest) {
	t.Helper()
	src = newStore(t)
	src.PackLimit = 0
	mem := memLike(3, 24*MaxChunk)
	clear(mem[20*MaxChunk : 21*MaxChunk])
	core := randBytes(9, 50_000)
	m1 = commitJob(t, src, mem, core)
	for _, c := range []int{3, 10, 17} {
		mem[c*MaxChunk+5*PageSize+7] ^= 0x5a
	}
	core[100] ^= 1
	m2 = commitJob(t, src, mem, core)
	if m2.Stats.DeltaChunks != 3 {
		t.Fatalf("generation 2 has %d deltas, want 3", m2.Stats.DeltaChunks)
	}
	return src, m1, m2
}

func newImporter(t *testing.T, src, dst *Store) *Importer {
	t.Helper()
	key, err := src.KeyHex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := dst.NewImporter(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}

// TestTransferGenerations: a standby receives generation 1 whole, then of
// generation 2 only the chunks it added (its deltas, not their bases);
// both verify there and restore the source's files byte for byte. Retain
// with the source's list and GC keep generation 2 whole.
func TestTransferGenerations(t *testing.T) {
	src, m1, m2 := twoGenerations(t)
	dst, err := Create(filepath.Join(t.TempDir(), "standby"), "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	im := newImporter(t, src, dst)

	sent1 := sendGeneration(t, src, m1, im)
	if len(sent1) != m1.Stats.NewChunks {
		t.Errorf("generation 1: sent %d chunks, it has %d", len(sent1), m1.Stats.NewChunks)
	}
	if st := im.Stats(); st.Bytes != m1.Stats.NewBytes {
		t.Errorf("generation 1: the standby stored %d bytes, the source %d", st.Bytes, m1.Stats.NewBytes)
	}
	checkMirror(t, src, dst, 1)

	before := im.Stats()
	names, err := src.GenerationChunks(m2)
	if err != nil {
		t.Fatal(err)
	}
	sent2 := sendGeneration(t, src, m2, im)
	if len(sent2) != m2.Stats.NewChunks || 4*len(sent2) > len(names) {
		t.Errorf("generation 2: sent %d of its %d chunks; it added %d", len(sent2), len(names), m2.Stats.NewChunks)
	}
	for _, n := range sent2 {
		for _, f := range m1.Files {
			for _, c := range f.Chunks {
				if c.Hash == n {
					t.Errorf("generation 2: sent %s, a chunk of generation 1", n)
				}
			}
		}
	}
	if got := im.Stats().Bytes - before.Bytes; got != m2.Stats.NewBytes {
		t.Errorf("generation 2: the standby stored %d bytes, the source added %d", got, m2.Stats.NewBytes)
	}
	checkMirror(t, src, dst, 2)

	// Sending again costs nothing and changes nothing.
	if again := sendGeneration(t, src, m2, im); len(again) != 0 {
		t.Errorf("generation 2 sent again: %d chunks", len(again))
	}

	removed, err := im.Retain([]int{2})
	if err != nil || !slices.Equal(removed, []int{1}) {
		t.Fatalf("Retain([2]) = %v, %v", removed, err)
	}
	if _, err := im.GC(); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	dst2, err := Open(dst.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if gens, _ := dst2.Generations(); !slices.Equal(gens, []int{2}) {
		t.Errorf("the standby has generations %v after Retain([2])", gens)
	}
	checkMirror(t, src, dst2, 2)
}

// TestTransferStartsAtDeltaGeneration: a standby that first receives
// generation 2 gets the bases of its deltas with it, ahead of them, in one
// import (the pack holding the bases is finished once, so the deltas can
// be checked against them).
func TestTransferStartsAtDeltaGeneration(t *testing.T) {
	src, m1, m2 := twoGenerations(t)
	names, err := src.GenerationChunks(m2)
	if err != nil {
		t.Fatal(err)
	}
	// Every base comes before the deltas on it.
	pos := map[string]int{}
	for i, n := range names {
		if _, dup := pos[n]; dup {
			t.Fatalf("%s listed twice", n)
		}
		pos[n] = i
	}
	ps, err := src.Packs()
	if err != nil {
		t.Fatal(err)
	}
	deltas := 0
	for _, p := range ps {
		for _, r := range p.Records {
			if i, ok := pos[r.Hash]; ok && r.Kind == "delta" {
				deltas++
				if j, ok := pos[r.Base]; !ok || j > i {
					t.Errorf("delta %.12s listed at %d, its base %.12s at %d (listed %v)", r.Hash, i, r.Base, j, ok)
				}
			}
		}
	}
	if deltas != 3 {
		t.Errorf("%d deltas among generation 2's chunks, want 3", deltas)
	}

	dst, err := Create(filepath.Join(t.TempDir(), "standby"), "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	im := newImporter(t, src, dst)
	sendGeneration(t, src, m2, im)
	checkMirror(t, src, dst, 2)
	if st := im.Stats(); st.Packs > 2 {
		t.Errorf("the import wrote %d packs, want at most 2", st.Packs)
	}
	// Generation 1 afterwards: only its core image; its versions of the
	// chunks that changed came with generation 2, as bases.
	if sent := sendGeneration(t, src, m1, im); len(sent) != 1 || sent[0] != chunkOf(m1, "core-1.img").Hash {
		t.Errorf("generation 1 after 2: sent %d chunks, want its core image only", len(sent))
	}
	checkMirror(t, src, dst, 1)
}

// TestImporterRefusesOtherKey: a store that holds chunks named with
// another key takes none of this source's, and stays as it was, unlocked.
func TestImporterRefusesOtherKey(t *testing.T) {
	src, _, _ := twoGenerations(t)
	other := newStore(t)
	commitJob(t, other, randBytes(5, MaxChunk), []byte("core"))
	key, _ := src.KeyHex()
	otherKey, _ := other.KeyHex()
	_, err := other.NewImporter(context.Background(), key)
	if !errors.Is(err, ErrKeyMismatch) {
		t.Fatalf("NewImporter into a store of another key: %v, want ErrKeyMismatch", err)
	}
	if strings.Contains(err.Error(), key) {
		t.Errorf("the error shows the key: %v", err)
	}
	if k, _ := other.KeyHex(); k != otherKey {
		t.Error("the refused store's key changed")
	}
	unlock, err := other.Lock(context.Background(), true)
	if err != nil {
		t.Fatalf("the refused store is still locked: %v", err)
	}
	unlock()
	if _, err := other.NewImporter(context.Background(), "abc"); err == nil {
		t.Error("a key of 3 hex digits was taken")
	}
}

// reseal returns the header of r with blob z: a record whose CRCs match
// whatever z holds.
func reseal(t *testing.T, header, z []byte) []byte {
	t.Helper()
	r, err := decodeRecord(header)
	if err != nil {
		t.Fatal(err)
	}
	r.z, r.check = uint32(len(z)), fileCheckBits(z)
	h := make([]byte, recHeader)
	r.encode(h)
	return h
}

func exported(t *testing.T, s *Store, name string) (header, blob []byte) {
	t.Helper()
	if err := s.ExportBlob(name, func(h, b []byte) error {
		header, blob = slices.Clone(h), slices.Clone(b)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return header, blob
}

func recordKind(t *testing.T, s *Store, kind string, in []string) string {
	t.Helper()
	ps, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Kind == kind && slices.Contains(in, r.Hash) {
				return r.Hash
			}
		}
	}
	t.Fatalf("no %s among %d chunks", kind, len(in))
	return ""
}

// TestImporterRefusesTamperedRecords: a record whose blob is damaged, or
// altered with its CRCs made to match (a whole chunk's content, a delta's
// pages, another chunk's blob under this name), is refused with
// ErrCorrupt, and nothing is appended; a manifest that needs it then does
// not commit.
func TestImporterRefusesTamperedRecords(t *testing.T) {
	src, m1, m2 := twoGenerations(t)
	dst := newStore(t)
	im := newImporter(t, src, dst)
	sendGeneration(t, src, m1, im)
	sent := im.Stats()

	names, err := src.GenerationChunks(m2)
	if err != nil {
		t.Fatal(err)
	}
	missing, err := im.Missing(names)
	if err != nil {
		t.Fatal(err)
	}
	full := recordKind(t, src, "chunk", missing)
	delta := recordKind(t, src, "delta", missing)
	fh, fz := exported(t, src, full)
	dh, dz := exported(t, src, delta)
	other := chunkOf(m1, "pages-1.img").Hash
	_, oz := exported(t, src, other)

	altered := func(z []byte, at func(payload []byte) int) []byte {
		p, err := decodeFrame(z, nil)
		if err != nil {
			t.Fatal(err)
		}
		p[at(p)] ^= 0x10
		return rawFrame(p, nil)
	}
	fullAltered := altered(fz, func(p []byte) int { return len(p) / 2 })
	deltaAltered := altered(dz, func(p []byte) int { return len(p) - 1 }) // a page, not the bitmap
	flipped := slices.Clone(fz)
	flipped[len(flipped)/2] ^= 1
	for _, tc := range []struct {
		name         string
		header, blob []byte
	}{
		{"damaged blob", fh, flipped},
		{"blob cut short", fh, fz[:len(fz)-1]},
		{"whole chunk altered, CRCs matching", reseal(t, fh, fullAltered), fullAltered},
		{"delta altered, CRCs matching", reseal(t, dh, deltaAltered), deltaAltered},
		{"another chunk's blob under this name", reseal(t, fh, oz), oz},
		{"not a compressed blob", reseal(t, fh, []byte("plain text")), []byte("plain text")},
	} {
		if err := im.Put(tc.header, tc.blob); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Put = %v, want ErrCorrupt", tc.name, err)
		}
	}
	if im.Stats() != sent {
		t.Errorf("refused records were appended: %+v, before %+v", im.Stats(), sent)
	}
	if left, _ := im.Missing([]string{full, delta}); len(left) != 2 {
		t.Errorf("Missing after refused Puts = %v, want both", left)
	}
	// Everything else of generation 2, but not those two.
	for _, n := range missing {
		if n == full || n == delta {
			continue
		}
		h, b := exported(t, src, n)
		if err := im.Put(h, b); err != nil {
			t.Fatal(err)
		}
	}
	mb, _ := src.ManifestBytes(2)
	if _, err := im.Commit(mb); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Commit without the refused chunks: %v, want ErrIncomplete", err)
	}
	if gens, _ := dst.Generations(); !slices.Equal(gens, []int{1}) {
		t.Errorf("generations %v after a refused commit", gens)
	}
	checkMirror(t, src, dst, 1)
	// The genuine records complete it.
	for _, n := range []string{full, delta} {
		h, b := exported(t, src, n)
		if err := im.Put(h, b); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := im.Commit(mb); err != nil {
		t.Fatal(err)
	}
	checkMirror(t, src, dst, 2)
}

// TestImporterMissingChunk: a manifest that names a chunk never sent
// commits nothing (ErrIncomplete); the store still verifies, and sending
// the chunk then lets the same manifest commit.
func TestImporterMissingChunk(t *testing.T) {
	src, m1, _ := twoGenerations(t)
	dst := newStore(t)
	im := newImporter(t, src, dst)
	names, err := src.GenerationChunks(m1)
	if err != nil {
		t.Fatal(err)
	}
	held := names[len(names)/2]
	for _, n := range names {
		if n == held {
			continue
		}
		if err := src.ExportBlob(n, im.Put); err != nil {
			t.Fatal(err)
		}
	}
	mb, _ := src.ManifestBytes(1)
	_, err = im.Commit(mb)
	if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), held) {
		t.Fatalf("Commit without chunk %s: %v, want ErrIncomplete naming it", held, err)
	}
	if gens, _ := dst.Generations(); len(gens) != 0 {
		t.Fatalf("generations %v after a refused commit", gens)
	}
	if _, err := dst.ReadManifest(1); !errors.Is(err, ErrNoGeneration) {
		t.Errorf("ReadManifest(1) = %v, want ErrNoGeneration", err)
	}
	if left, _ := im.Missing(names); !slices.Equal(left, []string{held}) {
		t.Errorf("Missing = %v, want only %s", left, held)
	}
	if err := src.ExportBlob(held, im.Put); err != nil {
		t.Fatal(err)
	}
	if _, err := im.Commit(mb); err != nil {
		t.Fatal(err)
	}
	checkMirror(t, src, dst, 1)
}

// TestImporterManifestChecks: a manifest that fails its checksum, or
// says what no store does, is refused with ErrCorrupt; the same
// generation again is a no-op, and another manifest of a number the
// standby has is ErrDiverged.
func TestImporterManifestChecks(t *testing.T) {
	src, m1, _ := twoGenerations(t)
	dst := newStore(t)
	im := newImporter(t, src, dst)
	names, _ := src.GenerationChunks(m1)
	for _, n := range names {
		if err := src.ExportBlob(n, im.Put); err != nil {
			t.Fatal(err)
		}
	}
	mb, _ := src.ManifestBytes(1)
	badSum := bytes.Replace(mb, []byte(`"checksum":"`), []byte(`"checksum":"0`), 1)
	badSum = append(badSum[:len(badSum)-3], badSum[len(badSum)-2:]...) // same length
	host := bytes.Replace(mb, []byte(`"host":"source"`), []byte(`"host":"sourcf"`), 1)
	for name, b := range map[string][]byte{
		"checksum":       badSum,
		"changed field":  host,
		"cut short":      mb[:len(mb)/2],
		"not a manifest": []byte("{}"),
	} {
		if _, err := im.Commit(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Commit = %v, want ErrCorrupt", name, err)
		}
	}
	if gens, _ := dst.Generations(); len(gens) != 0 {
		t.Fatalf("generations %v after refused manifests", gens)
	}
	if _, err := im.Commit(mb); err != nil {
		t.Fatal(err)
	}
	if gen, err := im.Commit(mb); err != nil || gen != 1 {
		t.Errorf("the same generation again: %d, %v", gen, err)
	}
	m, err := parseManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	m.Host = "elsewhere"
	other, err := m.seal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.Commit(other); !errors.Is(err, ErrDiverged) {
		t.Errorf("another generation 1: %v, want ErrDiverged", err)
	}
	checkMirror(t, src, dst, 1)
}

// TestImporterBoundsHeader: a header that claims a huge blob, or is not a
// record header, is refused before anything is allocated for what it
// claims.
func TestImporterBoundsHeader(t *testing.T) {
	src, m1, _ := twoGenerations(t)
	dst := newStore(t)
	im := newImporter(t, src, dst)
	name := chunkOf(m1, "core-1.img").Hash
	h, z := exported(t, src, name)
	if n, err := ExportedBlobLen(h); err != nil || n != len(z) || n > MaxExportBlob {
		t.Fatalf("ExportedBlobLen of a good header = %d, %v; the blob has %d bytes", n, err, len(z))
	}
	set := func(at int, v uint32) []byte {
		b := slices.Clone(h)
		binary.LittleEndian.PutUint32(b[at:], v)
		binary.LittleEndian.PutUint32(b[88:], crc32.Checksum(b[:88], castagnoli))
		return b
	}
	flag := slices.Clone(h)
	flag[5] = 0x80
	binary.LittleEndian.PutUint32(flag[88:], crc32.Checksum(flag[:88], castagnoli))
	crc := slices.Clone(h)
	crc[20] ^= 1
	for name, hdr := range map[string][]byte{
		"blob of 4 GiB":       set(76, 0xffff_ffff),
		"blob past the max":   set(76, MaxExportBlob+1),
		"chunk of 4 GiB":      set(72, 0xffff_ffff),
		"unknown kind":        set(4, 7),
		"unknown flag":        flag,
		"header CRC":          crc,
		"long header":         append(slices.Clone(h), make([]byte, 1<<20)...),
		"short header":        h[:recHeader-1],
		"not a header at all": make([]byte, recHeader),
	} {
		var err error
		if a := allocated(func() { err = im.Put(hdr, z) }); a > 64<<10 {
			t.Errorf("%s: Put allocated %d bytes", name, a)
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Put = %v, want ErrCorrupt", name, err)
		}
		if _, err := ExportedBlobLen(hdr); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: ExportedBlobLen = %v, want ErrCorrupt", name, err)
		}
	}
	if st := im.Stats(); st.Chunks != 0 {
		t.Errorf("%d records appended", st.Chunks)
	}
}

// packFiles lists packs/ (finished packs and .tmp files).
func packFiles(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.Dir, "packs"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// storedChunks lists the names of the records in s's packs, sorted.
func storedChunks(t *testing.T, s *Store) []string {
	t.Helper()
	ps, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range ps {
		for _, r := range p.Records {
			out = append(out, r.Hash)
		}
	}
	slices.Sort(out)
	return out
}

// TestImporterCloseWithoutCommit: an import closed before its commit
// leaves no unfinished pack nor staging, the store verifies and opens,
// GC is refused while records are uncommitted, and GC after Close removes
// the packs the import finished.
func TestImporterCloseWithoutCommit(t *testing.T) {
	for _, limit := range []int64{0, 1} { // records in the open pack; a pack per record
		src, m1, m2 := twoGenerations(t)
		dst := newStore(t)
		dst.PackLimit = limit
		im := newImporter(t, src, dst)
		sendGeneration(t, src, m1, im)
		before := storedChunks(t, dst)

		names, _ := src.GenerationChunks(m2)
		missing, _ := im.Missing(names)
		for _, n := range missing {
			if err := src.ExportBlob(n, im.Put); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := im.GC(); err == nil {
			t.Errorf("limit %d: GC ran with uncommitted records", limit)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Errorf("a second Close: %v", err)
		}
		if err := im.Put(exported(t, src, missing[0])); err == nil {
			t.Errorf("limit %d: Put after Close succeeded", limit)
		}
		for _, f := range packFiles(t, dst) {
			if isPackTemp(f) {
				t.Errorf("limit %d: Close left %s", limit, f)
			}
		}
		if ents, _ := os.ReadDir(filepath.Join(dst.Dir, "staging")); len(ents) != 0 {
			t.Errorf("limit %d: Close left staging/%s", limit, ents[0].Name())
		}
		if gens, _ := dst.Generations(); !slices.Equal(gens, []int{1}) {
			t.Errorf("limit %d: generations %v", limit, gens)
		}
		dst2, err := Open(dst.Dir)
		if err != nil {
			t.Fatal(err)
		}
		dst2.PackLimit = limit // GC merges nothing
		checkMirror(t, src, dst2, 1)
		unlock, err := dst2.Lock(context.Background(), true)
		if err != nil {
			t.Fatalf("Close did not release the lock: %v", err)
		}
		if _, err := dst2.GC(); err != nil {
			t.Fatal(err)
		}
		unlock()
		// (GC may repack a pack of generation 1 that holds a tiny record;
		// what matters is which chunks the packs hold.)
		if after := storedChunks(t, dst2); !slices.Equal(after, before) {
			t.Errorf("limit %d: %d chunks stored after GC, %d before the import", limit, len(after), len(before))
		}
		checkMirror(t, src, dst2, 1)
	}
}

// TestExportBlobSkipsDamagedCopy: of a chunk stored twice, the copy that
// checks out is exported; with both damaged, nothing is (ErrCorrupt); an
// error of the callback is returned as it is.
func TestExportBlobSkipsDamagedCopy(t *testing.T) {
	s := newStore(t)
	_, m := commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"core-1.img": randBytes(4, 70_000)}), nil)
	name := chunkOf(m, "core-1.img").Hash
	good := blobBytes(t, s, name)
	// A second copy, then damage to the first pack that holds one.
	hb, _ := hashBytes(name)
	ix, _ := s.index()
	pw := s.newPackWriter()
	if _, err := pw.append(ix.lookup(hb)[0].record, good); err != nil {
		t.Fatal(err)
	}
	if err := pw.finish(); err != nil {
		t.Fatal(err)
	}
	flipBlob(t, s, name)
	s, _ = Open(s.Dir)
	_, z := exported(t, s, name)
	if !bytes.Equal(z, good) {
		t.Error("exported a damaged copy")
	}
	for _, p := range packFiles(t, s) {
		path := filepath.Join(s.Dir, "packs", p)
		b := readFile(t, path)
		if i := bytes.Index(b, good); i >= 0 {
			b[i+len(good)/2] ^= 0x40
			writeFile(t, path, b)
		}
	}
	s, _ = Open(s.Dir)
	if err := s.ExportBlob(name, func(h, b []byte) error { return nil }); !errors.Is(err, ErrCorrupt) {
		t.Errorf("ExportBlob with every copy damaged: %v, want ErrCorrupt", err)
	}
	s2 := newStore(t)
	_, m2 := commit(t, s2, writeSpecs(t, t.TempDir(), map[string][]byte{"core-1.img": randBytes(4, 70_000)}), nil)
	errSend := errors.New("connection lost")
	if err := s2.ExportBlob(chunkOf(m2, "core-1.img").Hash, func(h, b []byte) error { return errSend }); err != errSend {
		t.Errorf("ExportBlob returned %v for the callback's error", err)
	}
	if _, err := s2.GenerationChunks(&Manifest{Format: 2, Generation: 1}); err == nil {
		t.Error("GenerationChunks took a format-2 manifest")
	}
}

// TestImporterConcurrentPuts: records Put from several goroutines at once
// (a transport that spreads the checking over cores) commit and verify.
func TestImporterConcurrentPuts(t *testing.T) {
	src, m1, _ := twoGenerations(t)
	dst, err := Create(filepath.Join(t.TempDir(), "standby"), "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	im := newImporter(t, src, dst)
	names, _ := src.GenerationChunks(m1)
	work := make(chan string)
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(names))
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range work {
				errs <- src.ExportBlob(n, func(h, b []byte) error {
					return im.Put(slices.Clone(h), slices.Clone(b))
				})
			}
		}()
	}
	for _, n := range append(names, names...) { // each twice: stored once
		work <- n
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if st := im.Stats(); st.Chunks != len(names) {
		t.Errorf("%d records appended for %d chunks", st.Chunks, len(names))
	}
	mb, _ := src.ManifestBytes(1)
	if _, err := im.Commit(mb); err != nil {
		t.Fatal(err)
	}
	checkMirror(t, src, dst, 1)
	if k, _ := dst.KeyHex(); k != hex.EncodeToString(src.key[:]) {
		t.Error("the standby did not adopt the source's key")
	}
}
