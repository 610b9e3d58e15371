package store

import (
	"bytes"
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

// Writer builds one new generation in staging/. Chunks are hashed,
// compressed and written by a pool of workers as they are submitted, from
// files (AddFiles) or from a stream (Begin, FileWriter.Put), so a producer
// such as a page server overlaps with the storing. The caller must hold the
// exclusive lock and either Commit or Abort.
type Writer struct {
	s       *Store
	staging string
	jobs    chan chunkJob
	workers sync.WaitGroup
	pending sync.WaitGroup
	bufs    chan []byte   // free buffers, kept (a sync.Pool loses them at every GC)
	hold    chan struct{} // closed when workers may start (WriterOptions.Hold)
	holdOne sync.Once
	seen    sync.Map // hash -> *inflight

	mu       sync.Mutex
	files    []*FileWriter
	firstErr error
	closed   bool

	rep *replicaWriter // nil without a replica (replica.go)

	// known gives the chunks of the newest committed generation, by hash:
	// what it recorded of a chunk file (size, Check) is reused for a chunk
	// that is stored already. It reads the manifest when a chunk first
	// needs it, not before the dump starts (a new store never does).
	known func() map[string]Chunk

	arena []byte // WriterOptions.Prefill's buffers, unmapped by stop
}

type chunkJob struct {
	f    *FileWriter
	idx  int
	data []byte
}

// FileWriter receives one file's chunks in order.
type FileWriter struct {
	w      *Writer
	file   File
	next   int
	chunks []pieceResult // by index; filled by workers
}

type pieceResult struct {
	c     Chunk
	fresh bool
	done  bool
}

// WriterOptions tunes a writer.
type WriterOptions struct {
	// Queue is how many chunks may wait for a worker before producers
	// block (default 64). A producer that must not be slowed, such as a
	// frozen job's page stream, wants a deep queue.
	Queue int
	// Hold keeps the workers idle until Release (or until the queue is
	// full): while a job is frozen, its pages are only copied into memory,
	// and hashing and compression wait for it to run again instead of
	// taking CPU from the dump.
	Hold bool
	// Replica, when set, is a second store that receives a byte-identical
	// copy of every chunk and of the manifest, committed before this
	// store's (see replica.go). The caller holds its exclusive lock too. A
	// failing replica does not fail the writer (see ReplicaErr) unless
	// ReplicaRequired is set.
	Replica         *Store
	ReplicaRequired bool
	// Prefill allocates about this many bytes of chunk buffers, faulted in,
	// before NewWriterOpts returns: a producer that must be fast (a frozen
	// job's page stream) then copies into memory that is ready, instead of
	// paying for fresh pages while the job waits. The queue is deepened to
	// hold them all. Unused where the memory cannot be had.
	Prefill int64
}

// NewWriter starts a generation.
func (s *Store) NewWriter() (*Writer, error) { return s.NewWriterOpts(WriterOptions{}) }

// NewWriterOpts starts a generation with options.
func (s *Store) NewWriterOpts(o WriterOptions) (*Writer, error) {
	staging, err := os.MkdirTemp(filepath.Join(s.Dir, "staging"), "gen-")
	if err != nil {
		return nil, fmt.Errorf("create staging: %w", err)
	}
	if o.Queue <= 0 {
		o.Queue = 64
	}
	var arena []byte
	if n := int(o.Prefill / MaxChunk); n > 0 {
		// One mapping, populated at once, is much cheaper than faulting in
		// n buffers page by page.
		if a, err := unix.Mmap(-1, 0, n*MaxChunk, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE); err == nil {
			arena = a
			o.Queue = max(o.Queue, n)
		}
	}
	w := &Writer{s: s, staging: staging, jobs: make(chan chunkJob, o.Queue), known: sync.OnceValue(s.newestChunks),
		bufs: make(chan []byte, max(min(o.Queue+8, 4096), len(arena)/MaxChunk+8)), hold: make(chan struct{}), arena: arena}
	for i := 0; i+MaxChunk <= len(arena); i += MaxChunk {
		w.bufs <- arena[i : i : i+MaxChunk]
	}
	if !o.Hold {
		w.Release()
	}
	if o.Replica != nil {
		w.rep = newReplicaWriter(s, o.Replica, o.ReplicaRequired)
	}
	// Two more workers than CPUs: a worker waiting for its chunk's write
	// (O_DIRECT waits for the disk) leaves its CPU to another.
	for range runtime.GOMAXPROCS(0) + 2 {
		w.workers.Add(1)
		go w.work()
	}
	return w, nil
}

// Staging is the writer's private staging directory.
func (w *Writer) Staging() string { return w.staging }

// Buffer returns an empty buffer of capacity MaxChunk for Put; Put takes
// it over and recycles it.
func (w *Writer) Buffer() []byte {
	select {
	case b := <-w.bufs:
		return b[:0]
	default:
		return make([]byte, 0, MaxChunk)
	}
}

func (w *Writer) recycle(b []byte) {
	if cap(b) != MaxChunk {
		return
	}
	select {
	case w.bufs <- b[:0]:
	default:
	}
}

// Release lets the workers start (see WriterOptions.Hold).
func (w *Writer) Release() { w.holdOne.Do(func() { close(w.hold) }) }

func (w *Writer) fail(err error) {
	w.mu.Lock()
	if w.firstErr == nil {
		w.firstErr = err
	}
	w.mu.Unlock()
}

// Err is the first error a worker met, if any.
func (w *Writer) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.firstErr
}

// Begin adds a file to the generation; its chunks follow by Put.
func (w *Writer) Begin(name, kind string, mode os.FileMode) *FileWriter {
	fw := &FileWriter{w: w, file: File{Name: name, Kind: kind, Mode: uint32(mode.Perm())}}
	w.mu.Lock()
	w.files = append(w.files, fw)
	w.mu.Unlock()
	return fw
}

// Put submits the file's next chunk (at most MaxChunk bytes). The writer
// owns data from now on. It blocks while the queue is full.
func (fw *FileWriter) Put(data []byte) error {
	if len(data) > MaxChunk {
		return fmt.Errorf("chunk of %d bytes exceeds %d", len(data), MaxChunk)
	}
	if err := fw.w.Err(); err != nil {
		fw.w.recycle(data)
		return err
	}
	fw.w.mu.Lock()
	idx := fw.next
	fw.next++
	fw.chunks = append(fw.chunks, pieceResult{})
	fw.w.mu.Unlock()
	fw.file.Size += int64(len(data))
	fw.w.pending.Add(1)
	select {
	case fw.w.jobs <- chunkJob{f: fw, idx: idx, data: data}:
	default:
		// The queue is full: holding on would stall the producer.
		fw.w.Release()
		fw.w.jobs <- chunkJob{f: fw, idx: idx, data: data}
	}
	return nil
}

func (w *Writer) work() {
	defer w.workers.Done()
	cd, err := newCoder()
	if err != nil {
		w.fail(err)
	}
	<-w.hold
	for j := range w.jobs {
		if cd != nil && w.Err() == nil {
			var r pieceResult
			var err error
			r.c, r.fresh, err = w.putChunk(cd, j.data)
			r.done = true
			if err != nil {
				w.fail(err)
			} else {
				w.mu.Lock()
				j.f.chunks[j.idx] = r
				w.mu.Unlock()
			}
		}
		w.s.Progress.Add(int64(len(j.data)))
		w.recycle(j.data)
		w.pending.Done()
	}
	if cd != nil {
		cd.enc.Close()
	}
}

// AddFiles chunks, hashes, compresses and stores the files; chunks already
// in the store are not written again.
func (w *Writer) AddFiles(ctx context.Context, specs []FileSpec) error {
	for _, sp := range specs {
		if err := w.addFile(ctx, sp); err != nil {
			return err
		}
	}
	return w.Wait()
}

func (w *Writer) addFile(ctx context.Context, sp FileSpec) error {
	f, err := os.Open(sp.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	fw := w.Begin(sp.Name, sp.Kind, st.Mode())
	bounds := splitPoints(st.Size(), sp.Cuts)
	for j := 0; j+1 < len(bounds); j++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := bounds[j+1] - bounds[j]
		b := w.Buffer()[:n]
		if _, err := f.ReadAt(b, bounds[j]); err != nil && !errors.Is(err, io.EOF) {
			w.recycle(b)
			return fmt.Errorf("read %s: %w", sp.Path, err)
		}
		if err := fw.Put(b); err != nil {
			return err
		}
	}
	return nil
}

// Wait blocks until every submitted chunk is stored and returns the first
// error.
func (w *Writer) Wait() error {
	w.Release()
	w.pending.Wait()
	return w.Err()
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

// coder is one worker's encoder and buffers.
type coder struct {
	enc               *zstd.Encoder
	zbuf, probe, sbuf []byte
}

func newCoder() (*coder, error) {
	// One encoder per worker: a shared encoder serialises EncodeAll.
	// No frame checksum: every read checks the chunk file against its
	// Check, or the content against its SHA-256 name.
	// No entropy coding of literals: measured on the bench's 2 GiB job, it
	// costs 5% more bytes (0.245x of raw instead of 0.23x) and saves
	// 10-15% of a checkpoint's CPU, which on a 2-core node is its time; it
	// decodes faster too.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true), zstd.WithEncoderCRC(false),
		zstd.WithNoEntropyCompression(true))
	if err != nil {
		return nil, err
	}
	// zbuf is aligned and big enough for any compressed chunk, so that it
	// can be written with O_DIRECT (direct.go).
	return &coder{enc: enc, zbuf: alignedBuf(MaxChunk + 64<<10), probe: make([]byte, probeLen+64),
		sbuf: make([]byte, MaxChunk)}, nil
}

// compress returns b compressed (compressChunk), in a buffer that the next
// call reuses.
func (cd *coder) compress(b []byte) []byte {
	cd.zbuf, cd.probe = compressChunk(cd.enc, b, cd.zbuf, cd.probe, cd.sbuf)
	return cd.zbuf
}

// putChunk stores b under its hash unless it is there already.
func (w *Writer) putChunk(cd *coder, b []byte) (Chunk, bool, error) {
	if isZero(b) {
		// Zero memory is common (touched, never written, or cleared) and
		// needs neither hashing, compressing nor storing: the manifest
		// says so and restore leaves a hole.
		return Chunk{Hash: zeroHash(len(b)), Len: int64(len(b)), Zero: true}, false, nil
	}
	sum := sha256.Sum256(b)
	hash := hex.EncodeToString(sum[:])
	c := Chunk{Hash: hash, Len: int64(len(b))}
	// The same content twice in one generation is written once: later
	// comers wait for the first.
	st := &inflight{done: make(chan struct{})}
	if prev, loaded := w.seen.LoadOrStore(hash, st); loaded {
		p := prev.(*inflight)
		<-p.done
		return p.c, false, p.err
	}
	defer close(st.done)
	c, fresh, err := w.storeChunk(cd, c, b)
	st.c, st.err = c, err
	return c, fresh, err
}

// fileHolds reports whether the chunk file at path decompresses to b, and
// then its Check.
func (s *Store) fileHolds(path string, b []byte) (check string, ok bool) {
	_ = s.direct.readChunkFile(path, func(z []byte) error {
		data, err := decodeFrame(z, nil)
		if ok = err == nil && bytes.Equal(data, b); ok {
			check = fileCheck(z)
		}
		return nil
	})
	return check, ok
}

// newestChunks indexes the chunks of the newest generation whose manifest
// reads, looking at the three newest at most (nil in a new store).
func (s *Store) newestChunks() map[string]Chunk {
	gens, err := s.Generations()
	if err != nil {
		return nil
	}
	for i := len(gens) - 1; i >= 0 && i >= len(gens)-3; i-- {
		m, err := s.ReadManifest(gens[i])
		if err != nil {
			continue
		}
		known := map[string]Chunk{}
		for _, f := range m.Files {
			for _, c := range f.Chunks {
				if !c.Zero {
					known[c.Hash] = c
				}
			}
		}
		return known
	}
	return nil
}

type inflight struct {
	done chan struct{}
	c    Chunk
	err  error
}

func (w *Writer) storeChunk(cd *coder, c Chunk, b []byte) (Chunk, bool, error) {
	path := w.s.ChunkPath(c.Hash)
	if st, err := os.Stat(path); err == nil {
		// The file is reused with the Check the newest generation
		// recorded for it. Another file (an older generation's, or left by
		// a checkpoint that did not commit) could hold anything, and a
		// Check would vouch for it: it gets one only after it decompresses
		// to this very content, and is written anew if it does not.
		k, known := w.known()[c.Hash]
		reuse := true
		if known && k.Stored == st.Size() && k.Check != "" {
			c.Check = k.Check
		} else {
			c.Check, reuse = w.s.fileHolds(path, b)
		}
		if reuse {
			c.Stored = st.Size()
			if w.rep != nil {
				c.Stored = w.rep.have(cd, c, b)
			}
			return c, false, nil
		}
	}
	z := cd.compress(b)
	c.Stored = int64(len(z))
	c.Check = fileCheck(z)
	if err := w.s.writeChunk(path, z); err != nil {
		return c, false, err
	}
	w.rep.put(c, z)
	return c, true, nil
}

// Stats are the store-side statistics of everything submitted so far (call
// after Wait).
func (w *Writer) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	var st Stats
	for _, fw := range w.files {
		st.RawBytes += fw.file.Size
		for _, r := range fw.chunks {
			st.Chunks++
			st.StoredBytes += r.c.Stored
			if r.fresh {
				st.NewChunks++
				st.NewBytes += r.c.Stored
			}
		}
	}
	return st
}

func (w *Writer) stop() {
	w.mu.Lock()
	closed := w.closed
	w.closed = true
	w.mu.Unlock()
	if !closed {
		close(w.jobs)
		w.workers.Wait()
		if w.arena != nil {
			// Every producer is done (a page stream is waited for before
			// its writer commits or aborts) and every worker has exited:
			// no buffer of the arena is in use.
			for len(w.bufs) > 0 {
				<-w.bufs
			}
			_ = unix.Munmap(w.arena)
			w.arena = nil
		}
	}
}

// Commit makes the generation durable and visible: syncfs flushes every
// chunk at once, then the manifest is written and fsynced, and the staging
// directory is renamed to checkpoints/<gen>, the commit point. m's Files,
// Generation, Format and the store fields of Stats are filled in here.
func (w *Writer) Commit(m *Manifest) (int, error) {
	if err := w.Wait(); err != nil {
		return 0, err
	}
	w.stop()
	gens, err := w.s.Generations()
	if err != nil {
		return 0, err
	}
	gen := 1
	if len(gens) > 0 {
		gen = gens[len(gens)-1] + 1
	}
	gen = w.rep.nextGen(gen)
	crashPoint("chunks-written")
	if err := syncFS(w.s.Dir); err != nil {
		return 0, err
	}
	m.Format = FormatVersion
	m.Generation = gen
	m.Files = nil
	for _, fw := range w.files {
		f := fw.file
		for _, r := range fw.chunks {
			if !r.done {
				return 0, fmt.Errorf("%s: a chunk was never stored", f.Name)
			}
			f.Chunks = append(f.Chunks, r.c)
		}
		if len(f.Chunks) == 0 {
			// An empty file still has one (empty) chunk.
			f.Chunks = []Chunk{{Hash: zeroHash(0), Zero: true}}
		}
		f.Digest = fileDigest(f.Chunks)
		m.Files = append(m.Files, f)
	}
	st := w.Stats()
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
	// The replica commits first: once this store shows the generation, its
	// copy is durable too.
	if err := w.rep.commit(gen, b); err != nil {
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
	crashPoint("manifest-written")
	if err := os.Rename(w.staging, w.s.GenDir(gen)); err != nil {
		return 0, fmt.Errorf("commit generation %d: %w", gen, err)
	}
	crashPoint("renamed")
	if err := syncDir(filepath.Join(w.s.Dir, "checkpoints")); err != nil {
		return gen, err
	}
	_ = syncDir(filepath.Join(w.s.Dir, "staging"))
	w.staging = ""
	return gen, nil
}

// Abort discards the staging directory. Chunks written stay until GC.
func (w *Writer) Abort() error {
	w.Release()
	w.fail(errors.New("aborted"))
	w.pending.Wait()
	w.stop()
	w.rep.abort()
	if w.staging == "" {
		return nil
	}
	err := os.RemoveAll(w.staging)
	w.staging = ""
	return err
}

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
