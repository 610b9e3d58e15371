package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
)

// A manifest is data from a directory its owner can write; its checksums
// say it is as written, not who wrote it. These tests seal manifests that
// say what they like (counts, sizes, names) and require that every
// operation a restore makes on them either refuses or stays within a
// memory bound that does not grow with what the manifest claims.

// allocated runs fn and returns the bytes it allocated (an upper bound of
// its peak heap).
func allocated(fn func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	fn()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

// stopAfter is a writer that fails after n bytes: a stream of a claimed
// terabyte of zeros is cut short.
type stopAfter struct{ n int64 }

var errEnough = errors.New("enough")

func (w *stopAfter) Write(p []byte) (int, error) {
	w.n -= int64(len(p))
	if w.n < 0 {
		return 0, errEnough
	}
	return len(p), nil
}

// useLikeRestore does with m what list, verify and restore do, reading at
// most 8 MiB of each file's stream.
func useLikeRestore(t *testing.T, s *Store, m *Manifest) {
	t.Helper()
	ctx := context.Background()
	s.Quick(m)
	s.Verify(ctx, m)
	src := s.NewSource(m, nil)
	for _, f := range m.Files {
		_ = src.Send(ctx, f.Name, &stopAfter{n: 8 << 20})
		if r, err := s.OpenFile(m, f.Name); err == nil {
			_, _ = io.CopyN(io.Discard, r, 8<<20)
		}
		_, _ = s.ReadAt(m, f.Name, 0, min(f.Size, 1<<20)) // a look at its head
	}
	dir := t.TempDir()
	_ = s.Materialize(ctx, m, dir)
	os.RemoveAll(dir)
}

var (
	meaningOnce  sync.Once
	meaningStore *Store
	meaningReal  []Chunk // chunks the store really holds
	meaningGen   int
	meaningMu    sync.Mutex
)

func meaningSetup(t *testing.T) *Store {
	meaningOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cryo-meaning-")
		if err != nil {
			t.Fatal(err)
		}
		s, err := Create(filepath.Join(dir, "store"), "fuzz")
		if err != nil {
			t.Fatal(err)
		}
		src := filepath.Join(dir, "src")
		if err := os.MkdirAll(src, 0o700); err != nil {
			t.Fatal(err)
		}
		_, m := commit(t, s, writeSpecs(t, src, map[string][]byte{"pages-1.img": memLike(3, 2*MaxChunk+5000)}), nil)
		meaningStore, meaningReal, meaningGen = s, m.Files[0].Chunks, 1
	})
	return meaningStore
}

// sealAs writes m, sealed, as a new generation's manifest and reads it
// back as a restore would.
func sealAs(t *testing.T, s *Store, m *Manifest) (*Manifest, int, error) {
	meaningMu.Lock()
	meaningGen++
	gen := meaningGen
	meaningMu.Unlock()
	m.Generation = gen
	b, err := m.seal()
	if err != nil {
		return nil, 0, err
	}
	if err := s.r.mkdirAll(genRel(gen)); err != nil {
		t.Fatal(err)
	}
	if err := s.r.writeFileAtomic(genRel(gen)+"/manifest.json", b); err != nil {
		t.Fatal(err)
	}
	got, err := s.ReadManifest(gen)
	_ = s.r.removeAll(genRel(gen))
	return got, len(b), err
}

// FuzzManifestMeaning: manifests whose checksums hold but whose counts,
// sizes and names are anything: each is refused when read, or is sane and
// costs a restore no more memory than a fixed bound plus a small multiple
// of its own size, whatever it claims.
func FuzzManifestMeaning(f *testing.F) {
	f.Add(uint16(2), uint16(3), int64(MaxChunk), uint8(0b101), "pages-1.img", "pages", int64(0), uint16(1), "tree-1", uint8(1))
	f.Add(uint16(1), uint16(300), int64(MaxChunk), uint8(0xff), "pagemap-1.img", "image", int64(0), uint16(0), "", uint8(0))
	f.Add(uint16(1), uint16(1), int64(1<<40), uint8(0xff), "pages-1.img", "pages", int64(1<<40), uint16(0), "", uint8(0))
	f.Add(uint16(3), uint16(2), int64(-5), uint8(0), "../../etc/x", "image", int64(-1), uint16(2), "../t", uint8(2))
	f.Add(uint16(60000), uint16(1), int64(0), uint8(1), "f", "log", int64(0), uint16(60000), "t", uint8(3))
	f.Fuzz(func(t *testing.T, files, chunks uint16, clen int64, zeroMask uint8, name, kind string, size int64, trees uint16, tree string, real uint8) {
		s := meaningSetup(t)
		m := &Manifest{Format: FormatVersion, Job: Job{RootPID: 1}}
		nf, nc := min(int(files), 64), min(int(chunks), 4096)
		if files > 64 { // a claim of many files costs one entry each here
			nf = 64
		}
		for i := range nf {
			fl := File{Name: name, Kind: kind, Mode: 0o600}
			if i > 0 {
				fl.Name = name + strconv.Itoa(i)
			}
			for k := range nc {
				var c Chunk
				switch {
				case zeroMask&(1<<(k%8)) != 0:
					c = Chunk{Len: clen, Zero: true}
				case real > 0 && len(meaningReal) > 0:
					c = meaningReal[(k+int(real))%len(meaningReal)]
				default:
					c = Chunk{Hash: fmt.Sprintf("%064x", k+1), Len: clen, Stored: clen / 2}
				}
				fl.Chunks = append(fl.Chunks, c)
				fl.Size += c.Len
			}
			if size != 0 {
				fl.Size = size
			}
			fl.Digest = fileDigest(fl.Chunks)
			m.Files = append(m.Files, fl)
		}
		for range min(int(trees), 256) {
			m.Job.Trees = append(m.Job.Trees, tree)
		}
		for p := range min(int(trees), 256) {
			m.Job.Processes = append(m.Job.Processes, Process{PID: p + 1, TIDs: []int{p + 1}})
		}
		got, n, err := sealAs(t, s, m)
		if err != nil {
			return
		}
		checkSane(t, got)
		bound := uint64(48<<20) + 64*uint64(n)
		if a := allocated(func() { useLikeRestore(t, s, got) }); a > bound {
			t.Fatalf("a manifest of %d bytes made a restore allocate %d bytes (bound %d)", n, a, bound)
		}
	})
}

// TestCraftedManifestMemory: the attack of issue 11 — a manifest of a few
// kilobytes that claims hundreds of megabytes of pagemap, mm and pages
// images in zero chunks (once 690 MB of a root restore). Claims beyond
// what an image can be are refused when it is read; within them, what a
// restore does with it allocates less than 48 MiB, not what it claims.
func TestCraftedManifestMemory(t *testing.T) {
	s := newStore(t)
	zerosOf := func(name, kind string, n int) File {
		f := File{Name: name, Kind: kind, Mode: 0o600}
		for range n {
			f.Chunks = append(f.Chunks, Chunk{Len: MaxChunk, Zero: true})
			f.Size += MaxChunk
		}
		f.Digest = fileDigest(f.Chunks)
		return f
	}
	// Refused: a 260 MiB pagemap.
	m := &Manifest{Format: FormatVersion, Generation: 1, Files: []File{zerosOf("pagemap-1.img", "image", 260)}}
	b, err := m.seal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parseManifest(b); err == nil {
		t.Errorf("a manifest of %d bytes claiming a 260 MiB pagemap was accepted", len(b))
	}
	// Within the bounds: 64 MiB images, 1 GiB of pages, all zeros.
	m = &Manifest{Format: FormatVersion, Job: Job{RootPID: 1}, Files: []File{
		zerosOf("pagemap-1.img", "image", 64), zerosOf("mm-1.img", "image", 64),
		zerosOf("core-1.img", "image", 64), zerosOf("pages-1.img", "pages", 1024)}}
	got, n, err := sealAs(t, s, m)
	if err != nil {
		t.Fatalf("a manifest within the bounds was refused: %v", err)
	}
	a := allocated(func() { useLikeRestore(t, s, got) })
	if a > 48<<20 {
		t.Errorf("a %d-byte manifest claiming 1.2 GiB made a restore allocate %d MiB", n, a>>20)
	}
	t.Logf("a %d-byte manifest claiming 1.2 GiB: a restore allocated %d KiB", n, a>>10)
	// A reader that wants an image whole asks for at most MaxImage, and
	// gets no more allocated than it asked for.
	if _, err := s.ReadAt(got, "core-1.img", 0, MaxImage+1); err == nil {
		t.Error("ReadAt gave more than MaxImage at once")
	}
	if a := allocated(func() { _, _ = s.ReadAt(got, "core-1.img", 0, 4<<20) }); a > 5<<20 {
		t.Errorf("ReadAt of 4 MiB allocated %d MiB", a>>20)
	}
}
