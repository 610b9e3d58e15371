package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// MaxChunk is the largest chunk the writer makes; callers' cuts only add
// boundaries.
const MaxChunk = 1 << 20

// FileSpec is one file to put into a generation.
type FileSpec struct {
	Path string // file to read
	Name string // name inside the generation (relative path)
	Kind string // "image", "pages" or "log"
	// Cuts are offsets where a chunk must begin (besides 0 and every
	// MaxChunk bytes since the previous cut), sorted ascending. Page images
	// are cut where address windows begin so that unchanged memory yields
	// identical chunks between generations.
	Cuts []int64
}

// Writer builds one new generation in staging/. It is used by one
// goroutine; it parallelises chunk work internally.
type Writer struct {
	s       *Store
	staging string
	files   []File
	stats   Stats
	workers int
	seen    sync.Map // hash -> *inflight
}

// NewWriter starts a generation. The caller must hold the exclusive lock
// and either Commit or Abort the writer.
func (s *Store) NewWriter() (*Writer, error) {
	staging, err := os.MkdirTemp(filepath.Join(s.Dir, "staging"), "gen-")
	if err != nil {
		return nil, fmt.Errorf("create staging: %w", err)
	}
	return &Writer{s: s, staging: staging, workers: runtime.GOMAXPROCS(0)}, nil
}

// Staging is the writer's private staging directory (for logs and journals
// that must not outlive a failed attempt).
func (w *Writer) Staging() string { return w.staging }

type piece struct {
	file, idx int
	off, len  int64
}

type pieceResult struct {
	c     Chunk
	fresh bool
}

// AddFiles chunks, hashes, compresses and stores the files in parallel.
// Chunks already in the store are not written again.
func (w *Writer) AddFiles(ctx context.Context, specs []FileSpec) error {
	var pieces []piece
	handles := make([]*os.File, len(specs))
	defer func() {
		for _, f := range handles {
			if f != nil {
				f.Close()
			}
		}
	}()
	results := make([][]pieceResult, len(specs))
	base := len(w.files)
	for i, sp := range specs {
		f, err := os.Open(sp.Path)
		if err != nil {
			return err
		}
		handles[i] = f
		st, err := f.Stat()
		if err != nil {
			return err
		}
		bounds := splitPoints(st.Size(), sp.Cuts)
		for j := 0; j+1 < len(bounds); j++ {
			pieces = append(pieces, piece{file: i, idx: j, off: bounds[j], len: bounds[j+1] - bounds[j]})
		}
		results[i] = make([]pieceResult, len(bounds)-1)
		w.files = append(w.files, File{Name: sp.Name, Size: st.Size(), Mode: uint32(st.Mode().Perm()), Kind: sp.Kind})
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan piece)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
		newBytes atomic.Int64
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
	}
	for range w.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One encoder per worker: a shared encoder serialises EncodeAll.
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
				zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
			if err != nil {
				fail(err)
				for range work {
				}
				return
			}
			defer enc.Close()
			var buf, zbuf []byte
			for p := range work {
				if cap(buf) < int(p.len) {
					buf = make([]byte, p.len)
				}
				b := buf[:p.len]
				if _, err := handles[p.file].ReadAt(b, p.off); err != nil && !errors.Is(err, io.EOF) {
					fail(fmt.Errorf("read %s: %w", specs[p.file].Path, err))
					continue
				}
				var r pieceResult
				var err error
				r.c, r.fresh, zbuf, err = w.putChunk(enc, b, zbuf)
				if err != nil {
					fail(err)
					continue
				}
				if r.fresh {
					newBytes.Add(r.c.Stored)
				}
				results[p.file][p.idx] = r
			}
		}()
	}
feed:
	for _, p := range pieces {
		select {
		case work <- p:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return firstErr
	}
	for i := range specs {
		f := &w.files[base+i]
		for _, r := range results[i] {
			f.Chunks = append(f.Chunks, r.c)
			w.stats.Chunks++
			w.stats.StoredBytes += r.c.Stored
			if r.fresh {
				w.stats.NewChunks++
			}
		}
		f.Digest = fileDigest(f.Chunks)
		w.stats.RawBytes += f.Size
	}
	w.stats.NewBytes += newBytes.Load()
	return nil
}

// splitPoints returns chunk boundaries from 0 to size: every cut inside
// (0,size), and extra boundaries so that no chunk exceeds MaxChunk.
func splitPoints(size int64, cuts []int64) []int64 {
	pts := []int64{0}
	add := func(to int64) {
		last := pts[len(pts)-1]
		for to-last > MaxChunk {
			last += MaxChunk
			pts = append(pts, last)
		}
		if to > last {
			pts = append(pts, to)
		}
	}
	for _, c := range cuts {
		if c > pts[len(pts)-1] && c < size {
			add(c)
		}
	}
	add(size)
	if size == 0 {
		pts = append(pts, 0)
	}
	return pts
}

// putChunk stores b under its hash unless it is there already. zbuf is
// scratch space, returned for reuse.
func (w *Writer) putChunk(enc *zstd.Encoder, b, zbuf []byte) (Chunk, bool, []byte, error) {
	if isZero(b) {
		// Zero memory is common (touched, never written, or cleared) and
		// needs neither hashing, compressing nor storing: the manifest
		// says so and restore leaves a hole.
		return Chunk{Hash: zeroHash(len(b)), Len: int64(len(b)), Zero: true}, false, zbuf, nil
	}
	sum := sha256.Sum256(b)
	hash := hex.EncodeToString(sum[:])
	c := Chunk{Hash: hash, Len: int64(len(b))}
	// The same content twice in one generation (zero pages, say) is
	// written once: later comers wait for the first.
	st := &inflight{done: make(chan struct{})}
	if prev, loaded := w.seen.LoadOrStore(hash, st); loaded {
		p := prev.(*inflight)
		<-p.done
		c.Stored = p.stored
		return c, false, zbuf, p.err
	}
	defer close(st.done)
	c, fresh, zbuf, err := w.storeChunk(enc, c, b, zbuf)
	st.stored, st.err = c.Stored, err
	return c, fresh, zbuf, err
}

type inflight struct {
	done   chan struct{}
	stored int64
	err    error
}

func (w *Writer) storeChunk(enc *zstd.Encoder, c Chunk, b, zbuf []byte) (Chunk, bool, []byte, error) {
	hash := c.Hash
	path := w.s.ChunkPath(hash)
	if st, err := os.Stat(path); err == nil {
		c.Stored = st.Size()
		return c, false, zbuf, nil
	}
	zbuf = enc.EncodeAll(b, zbuf[:0])
	c.Stored = int64(len(zbuf))
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return c, false, zbuf, err
	}
	f, err := os.CreateTemp(filepath.Dir(path), hash[:16]+".tmp*")
	if err != nil {
		return c, false, zbuf, fmt.Errorf("write chunk: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(zbuf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return c, false, zbuf, fmt.Errorf("write chunk %s: %w", path, err)
	}
	return c, true, zbuf, nil
}

// Commit makes the generation durable and visible: syncfs flushes every
// chunk at once, then the manifest is written and fsynced, and the staging
// directory is renamed to checkpoints/<gen>, the commit point. m's Files,
// Generation, Format and the store fields of Stats are filled in here.
func (w *Writer) Commit(m *Manifest) (int, error) {
	gens, err := w.s.Generations()
	if err != nil {
		return 0, err
	}
	gen := 1
	if len(gens) > 0 {
		gen = gens[len(gens)-1] + 1
	}
	if err := syncFS(w.s.Dir); err != nil {
		return 0, err
	}
	m.Format = FormatVersion
	m.Generation = gen
	m.Files = w.files
	st := w.stats
	st.FrozenMS, st.DumpMS, st.DurableMS = m.Stats.FrozenMS, m.Stats.DumpMS, m.Stats.DurableMS
	st.FreezingMS, st.MemdumpMS, st.MemwriteMS = m.Stats.FreezingMS, m.Stats.MemdumpMS, m.Stats.MemwriteMS
	st.PagesScanned, st.PagesWritten = m.Stats.PagesScanned, m.Stats.PagesWritten
	m.Stats = st
	if m.Created.IsZero() {
		m.Created = time.Now().UTC()
	}
	b, err := m.seal()
	if err != nil {
		return 0, err
	}
	// Only manifest.json may be in the generation directory.
	ents, _ := os.ReadDir(w.staging)
	for _, e := range ents {
		os.RemoveAll(filepath.Join(w.staging, e.Name()))
	}
	if err := writeFileAtomic(filepath.Join(w.staging, "manifest.json"), b); err != nil {
		return 0, fmt.Errorf("write manifest: %w", err)
	}
	if err := os.Rename(w.staging, w.s.GenDir(gen)); err != nil {
		return 0, fmt.Errorf("commit generation %d: %w", gen, err)
	}
	if err := syncDir(filepath.Join(w.s.Dir, "checkpoints")); err != nil {
		return gen, err
	}
	_ = syncDir(filepath.Join(w.s.Dir, "staging"))
	w.staging = ""
	return gen, nil
}

// Abort discards the staging directory. Chunks written stay until GC.
func (w *Writer) Abort() error {
	if w.staging == "" {
		return nil
	}
	err := os.RemoveAll(w.staging)
	w.staging = ""
	return err
}

// Stats so far (store fields only).
func (w *Writer) Stats() Stats { return w.stats }

func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}
