package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
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
// compressed and appended to pack files by a pool of workers as they are
// submitted, from files (AddFiles) or from a stream (Begin, FileWriter.Put),
// so a producer such as a page server overlaps with the storing. The
// caller must hold the exclusive lock and either Commit or Abort.
type Writer struct {
	s       *Store
	staging string // relative to the store: staging/gen-...
	key     [32]byte
	pw      *packWriter
	jobs    chan chunkJob
	workers sync.WaitGroup
	pending sync.WaitGroup
	bufs    chan []byte   // free buffers, kept (a sync.Pool loses them at every GC)
	hold    chan struct{} // closed when workers may start (WriterOptions.Hold)
	holdOne sync.Once
	seen    sync.Map // hash -> *inflight
	ix      *packIndex

	mu       sync.Mutex
	files    []*FileWriter
	firstErr error
	closed   bool
	newBytes int64 // blob bytes appended (chunks and digest tables)
	deltas   int

	rep *replicaWriter // nil without a replica (replica.go)

	// prev gives the chunks of the newest committed generation by place
	// (placeKey), the previous versions a changed chunk is stored against
	// as a delta. It reads the manifest when a chunk first needs it.
	prev func() map[string]Chunk

	arena []byte // WriterOptions.Prefill's buffers, unmapped by stop
}

type chunkJob struct {
	f     *FileWriter
	idx   int
	data  []byte
	place string
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
	// frozen job's page stream, wants a deep queue. It is cut to what
	// MaxMemory allows.
	Queue int
	// Hold keeps the workers idle until Release (or until the queue is
	// full): while a job is frozen, its pages are only copied into memory,
	// and hashing and compression wait for it to run again instead of
	// taking CPU from the dump.
	Hold bool
	// Replica, when set, is a second store that receives a byte-identical
	// copy of every blob and of the manifest, committed before this
	// store's (see replica.go). The caller holds its exclusive lock too. A
	// failing replica does not fail the writer (see ReplicaErr) unless
	// ReplicaRequired is set.
	Replica         *Store
	ReplicaRequired bool
	// Prefill allocates about this many bytes of chunk buffers, faulted in,
	// before NewWriterOpts returns: a producer that must be fast (a frozen
	// job's page stream) then copies into memory that is ready, instead of
	// paying for fresh pages while the job waits. The queue is deepened to
	// hold them all. Unused where the memory cannot be had; cut to what
	// MaxMemory allows.
	Prefill int64
	// MaxMemory bounds the chunk buffers the writer holds at once (queue
	// and prefill): DefaultWriterMemory when 0, unbounded when < 0. cryo's
	// memory then does not grow with the job; a frozen job whose pages do
	// not fit waits for the workers instead.
	MaxMemory int64
}

// DefaultWriterMemory is the chunk buffers a writer holds at most, unless
// WriterOptions.MaxMemory says otherwise.
const DefaultWriterMemory = 128 << 20

// NewWriter starts a generation.
func (s *Store) NewWriter() (*Writer, error) { return s.NewWriterOpts(WriterOptions{}) }

// NewWriterOpts starts a generation with options.
func (s *Store) NewWriterOpts(o WriterOptions) (*Writer, error) {
	key, err := s.keyed()
	if err != nil {
		return nil, err
	}
	ix, err := s.index()
	if err != nil {
		return nil, fmt.Errorf("read the store's pack index: %w", err)
	}
	staging := "staging/gen-" + newPackID()[:16]
	if err := s.r.mkdirAll(staging); err != nil {
		return nil, fmt.Errorf("create staging: %w", err)
	}
	if o.Queue <= 0 {
		o.Queue = 64
	}
	if o.MaxMemory == 0 {
		o.MaxMemory = DefaultWriterMemory
	}
	if o.MaxMemory > 0 {
		o.Queue = int(min(int64(o.Queue), max(o.MaxMemory/MaxChunk, 8)))
		o.Prefill = min(o.Prefill, o.MaxMemory)
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
	w := &Writer{s: s, staging: staging, key: key, pw: s.newPackWriter(), ix: ix,
		jobs: make(chan chunkJob, o.Queue), prev: sync.OnceValue(s.newestChunks),
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
	// Two more workers than CPUs: a worker waiting for its pack write
	// (O_DIRECT waits for the disk) leaves its CPU to another.
	for range runtime.GOMAXPROCS(0) + 2 {
		w.workers.Add(1)
		go w.work()
	}
	return w, nil
}

// Staging is the writer's private staging directory.
func (w *Writer) Staging() string { return w.s.r.pathOf(w.staging) }

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
func (fw *FileWriter) Put(data []byte) error { return fw.PutAt(data, 0) }

// PutAt is Put for a chunk of memory at virtual address addr (0: none):
// the address is the chunk's place, where the next generation looks for
// its previous version when the memory layout has shifted.
func (fw *FileWriter) PutAt(data []byte, addr uint64) error {
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
	fw.chunks = append(fw.chunks, pieceResult{c: Chunk{Addr: addr}})
	fw.w.mu.Unlock()
	place := placeKey(fw.file.Name, fw.file.Size, addr)
	fw.file.Size += int64(len(data))
	fw.w.pending.Add(1)
	j := chunkJob{f: fw, idx: idx, data: data, place: place}
	select {
	case fw.w.jobs <- j:
	default:
		// The queue is full: holding on would stall the producer.
		fw.w.Release()
		fw.w.jobs <- j
	}
	return nil
}

// placeKey names where a chunk is: its address in a pages image, else its
// offset in its file.
func placeKey(file string, off int64, addr uint64) string {
	if addr != 0 {
		return file + "@a" + strconv.FormatUint(addr, 16)
	}
	return file + "@o" + strconv.FormatInt(off, 16)
}

func (w *Writer) work() {
	defer w.workers.Done()
	cd, err := newCoder()
	if err != nil {
		w.fail(err)
	}
	x := newHasher(w.key)
	<-w.hold
	for j := range w.jobs {
		if cd != nil && w.Err() == nil {
			var r pieceResult
			var err error
			r.c, r.fresh, err = w.putChunk(cd, x, j)
			r.done = true
			if err != nil {
				w.fail(err)
			} else {
				w.mu.Lock()
				r.c.Addr = j.f.chunks[j.idx].c.Addr
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
	enc                           *zstd.Encoder
	zbuf, probe, sbuf, dbuf, bbuf []byte
	pages                         []int
}

func newCoder() (*coder, error) {
	// One encoder per worker: a shared encoder serialises EncodeAll.
	// No frame checksum: every read checks the blob against its Check, or
	// the content against its name.
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
	return &coder{enc: enc, zbuf: make([]byte, 0, MaxChunk+64<<10), probe: make([]byte, probeLen+64),
		sbuf: make([]byte, MaxChunk), dbuf: make([]byte, 0, MaxChunk+PageSize), bbuf: make([]byte, 0, MaxChunk)}, nil
}

// compress returns b compressed (compressChunk), in a buffer that the next
// call reuses.
func (cd *coder) compress(b []byte) []byte {
	cd.zbuf, cd.probe = compressChunk(cd.enc, b, cd.zbuf, cd.probe, cd.sbuf)
	return cd.zbuf
}

// compressSmall compresses a chunk of an image other than memory (CRIU's
// metadata, its log: kilobytes to a few megabytes a generation, written
// anew by most generations) harder, with entropy coding: it costs little
// time and, for the log, most of what a generation after a small change
// stores besides the pages.
// One encoder for them all, made when first needed: its tables are
// megabytes, one per worker would be a good part of the writer's memory,
// and the chunks it compresses are a few per generation.
func (cd *coder) compressSmall(b []byte) []byte {
	enc := betterEncoder()
	if enc == nil {
		return cd.compress(b)
	}
	cd.zbuf = enc.EncodeAll(b, cd.zbuf[:0])
	return cd.zbuf
}

var betterEncoder = sync.OnceValue(func() *zstd.Encoder {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithLowerEncoderMem(true),
		zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false), zstd.WithWindowSize(MaxChunk))
	if err != nil {
		return nil
	}
	return enc
})

// putChunk stores a chunk unless the store has it already: whole, or as a
// delta on its previous version's base (delta.go).
func (w *Writer) putChunk(cd *coder, x *hasher, j chunkJob) (Chunk, bool, error) {
	b := j.data
	if isZero(b) {
		// Zero memory is common (touched, never written, or cleared) and
		// needs neither hashing, compressing nor storing: the manifest
		// says so and restore leaves a hole.
		return Chunk{Len: int64(len(b)), Zero: true}, false, nil
	}
	hash := x.name(b)
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
	c, fresh, err := w.storeChunk(cd, c, j)
	st.c, st.err = c, err
	return c, fresh, err
}

type inflight struct {
	done chan struct{}
	c    Chunk
	err  error
}

func (w *Writer) storeChunk(cd *coder, c Chunk, j chunkJob) (Chunk, bool, error) {
	b := j.data
	hb, _ := hashBytes(c.Hash)
	if locs := w.ix.lookup(hb); len(locs) > 0 {
		// Stored already (by an earlier generation, or by a checkpoint that
		// did not commit: a pack is durable and whole before it has its
		// name).
		c.Stored, c.Check = int64(locs[0].z), checkString(locs[0].check)
		if w.rep.have(c) {
			return c, false, nil
		}
		// The store's copy is damaged (the replica's copy showed it): both
		// get a fresh one, which heals the store too.
	}
	if j.f.file.Kind == "pages" {
		if r, payload, ok := w.delta(cd, b, j); ok {
			r.hash, r.n = hb, uint32(len(b))
			return w.appendRec(c, r, cd.compress(payload))
		}
		return w.appendRec(c, record{kind: kindFull, hash: hb, n: uint32(len(b))}, cd.compress(b))
	}
	return w.appendRec(c, record{kind: kindFull, hash: hb, n: uint32(len(b))}, cd.compressSmall(b))
}

// appendRec appends a chunk's record to the store's pack and the
// replica's.
func (w *Writer) appendRec(c Chunk, r record, z []byte) (Chunk, bool, error) {
	loc, err := w.pw.append(r, z)
	if err != nil {
		return c, false, err
	}
	c.Stored, c.Check = int64(loc.z), checkString(loc.check)
	n := int64(len(z))
	w.rep.put(loc.record, z)
	w.mu.Lock()
	w.newBytes += n
	if r.kind == kindDelta {
		w.deltas++
	}
	w.mu.Unlock()
	return c, true, nil
}

// delta returns the record and payload of b as a delta on the base of the
// chunk's previous version, when there is one and at most half of b's
// pages differ from it. The base is read from the store and compared page
// by page: only a chunk that changed pays for it (an unchanged one has its
// name already), and nothing but the content itself decides what changed.
func (w *Writer) delta(cd *coder, b []byte, j chunkJob) (record, []byte, bool) {
	var r record
	pc, ok := w.prev()[j.place]
	if !ok || pc.Len != int64(len(b)) {
		return r, nil, false
	}
	r.kind = kindDelta
	var base []byte
	if pc.Zero {
		r.zeroBase, base = true, zeros[:len(b)]
	} else {
		h, ok := hashBytes(pc.Hash)
		if !ok {
			return r, nil, false
		}
		if locs := w.ix.lookup(h); len(locs) > 0 && locs[0].kind == kindDelta {
			h, r.zeroBase = locs[0].base, locs[0].zeroBase
		}
		r.base = h
		if r.zeroBase {
			base = zeros[:len(b)]
		} else {
			var err error
			if cd.bbuf, err = w.s.readBase(h, len(b), cd.bbuf[:0]); err != nil {
				return r, nil, false // stored whole, which needs no base
			}
			base = cd.bbuf
		}
	}
	np := pagesOf(len(b))
	cd.pages = cd.pages[:0]
	for p := range np {
		lo, hi := p*PageSize, min((p+1)*PageSize, len(b))
		if !bytes.Equal(b[lo:hi], base[lo:hi]) {
			if cd.pages = append(cd.pages, p); 2*len(cd.pages) > np {
				return r, nil, false
			}
		}
	}
	if len(cd.pages) == 0 {
		return r, nil, false // the same content as its base: named alike, stored already
	}
	cd.dbuf = encodeDelta(cd.dbuf, b, cd.pages)
	return r, cd.dbuf, true
}

// newestChunks indexes the chunks of the newest generation whose manifest
// reads, looking at the three newest at most (nil in a new store), by
// place.
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
		if m.Format < 3 {
			return nil // chunks named by content SHA-256, without digest tables
		}
		known := map[string]Chunk{}
		for _, f := range m.Files {
			var off int64
			for _, c := range f.Chunks {
				known[placeKey(f.Name, off, c.Addr)] = c
				off += c.Len
			}
		}
		return known
	}
	return nil
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
			}
		}
	}
	st.NewBytes = w.newBytes
	st.DeltaChunks = w.deltas
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

// Commit makes the generation durable and visible: the packs are closed
// (each fsynced before it gets its name), then the manifest is written and
// fsynced, and the staging directory is renamed to checkpoints/<gen>, the
// commit point. m's Files, Generation, Format and the store fields of
// Stats are filled in here.
func (w *Writer) Commit(m *Manifest) (int, error) {
	if err := w.Wait(); err != nil {
		return 0, err
	}
	w.stop()
	if err := w.pw.finish(); err != nil {
		return 0, err
	}
	gens, err := w.s.Generations()
	if err != nil {
		return 0, err
	}
	gen := 1
	if len(gens) > 0 {
		gen = gens[len(gens)-1] + 1
	}
	gen = w.rep.nextGen(gen)
	CrashPoint("chunks-written")
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
			f.Chunks = []Chunk{{Zero: true}}
		}
		f.Digest = fileDigest(f.Chunks)
		m.Files = append(m.Files, f)
	}
	st := w.Stats()
	st.FrozenMS, st.DumpMS, st.DurableMS = m.Stats.FrozenMS, m.Stats.DumpMS, m.Stats.DurableMS
	st.FreezingMS, st.MemdumpMS, st.MemwriteMS = m.Stats.FreezingMS, m.Stats.MemdumpMS, m.Stats.MemwriteMS
	st.PagesScanned, st.PagesWritten = m.Stats.PagesScanned, m.Stats.PagesWritten
	st.Packs = len(w.pw.finished)
	m.Stats = st
	if m.Created.IsZero() {
		m.Created = time.Now().UTC()
	}
	b, err := m.seal()
	if err != nil {
		return 0, err
	}
	if int64(len(b)) > MaxManifest {
		return 0, fmt.Errorf("the manifest would be %d bytes, more than the %d a store takes", len(b), MaxManifest)
	}
	// The replica commits first: once this store shows the generation, its
	// copy is durable too.
	if err := w.rep.commit(gen, b); err != nil {
		return 0, err
	}
	// Only manifest.json may be in the generation directory.
	if ents, err := w.s.r.readDir(w.staging); err == nil {
		for _, e := range ents {
			_ = w.s.r.removeAll(w.staging + "/" + e.Name())
		}
	}
	if err := w.s.r.writeFileAtomic(w.staging+"/manifest.json", b); err != nil {
		return 0, fmt.Errorf("write manifest: %w", err)
	}
	CrashPoint("manifest-written")
	if err := w.s.r.rename(w.staging, genRel(gen)); err != nil {
		return 0, fmt.Errorf("commit generation %d: %w", gen, err)
	}
	CrashPoint("renamed")
	if err := w.s.r.syncDir("checkpoints"); err != nil {
		return gen, err
	}
	_ = w.s.r.syncDir("staging")
	w.staging = ""
	return gen, nil
}

// Abort discards the staging directory and the pack being written. Packs
// already finished stay until GC.
func (w *Writer) Abort() error {
	w.Release()
	w.fail(errors.New("aborted"))
	w.pending.Wait()
	w.stop()
	w.pw.abort()
	w.rep.abort()
	if w.staging == "" {
		return nil
	}
	err := w.s.r.removeAll(w.staging)
	w.staging = ""
	return err
}
