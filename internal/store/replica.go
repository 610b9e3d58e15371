package store

// A replica is a second store (another disk, a partner node's mount) that
// holds byte-identical copies of a store's chunks and manifests, so that
// damage to one can be healed from the other. It is itself a valid store:
// list, verify and restore work on it directly.
//
// Writing. A Writer with WriterOptions.Replica appends every new blob to
// both stores' packs from the same compressed bytes (nothing is compressed
// or read twice), and copies a chunk the store already has but the replica
// lacks after checking it. Both stores name chunks with the same key (the
// replica adopts the store's when it is new). Commit makes both stores'
// packs durable, commits the replica's manifest, and only then the
// store's: once the store shows a generation, its replica copy is durable. A crash between the two leaves a complete
// generation in the replica that the store lacks, which is harmless; the
// next generation is numbered past both, so the numbers never diverge.
//
// Failure. A replica that cannot be written (missing mount, full disk) does
// not cost the checkpoint: the writer stops replicating, commits the store
// alone and reports the replica's error (Writer.ReplicaErr), unless
// ReplicaRequired makes it fail the commit.
//
// Healing. Chunks are named by their content, so adding a verified copy of
// a damaged chunk from the replica (in a new pack) is safe even while
// others read the store: they find the damaged copy or the good one, and
// a reader tries each. Repair heals a generation under the exclusive lock;
// MaterializeFrom heals what a restore trips over under the shared lock.

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sync"
)

// replicaWriter is a Writer's replica side. Its methods are safe on a nil
// receiver (no replica) and after a failure (they do nothing).
type replicaWriter struct {
	src, dst *Store
	required bool
	staging  string // relative to dst
	pw       *packWriter
	ix       *packIndex

	mu        sync.Mutex
	err       error
	committed bool
	newChunks int
	newBytes  int64
}

func newReplicaWriter(src, dst *Store, required bool) *replicaWriter {
	r := &replicaWriter{src: src, dst: dst, required: required, pw: dst.newPackWriter()}
	if err := dst.adoptKey(src); err != nil {
		r.fail(err)
		return r
	}
	ix, err := dst.index()
	if err != nil {
		r.fail(err)
		return r
	}
	r.ix = ix
	staging := "staging/gen-" + newPackID()[:16]
	if err := dst.r.mkdirAll(staging); err != nil {
		r.fail(fmt.Errorf("create staging: %w", err))
		return r
	}
	r.staging = staging
	return r
}

// ErrKeyMismatch means a store that is to receive another store's chunks
// (a replica, a standby) already holds chunks named with a different key.
var ErrKeyMismatch = errors.New("it holds chunks named with another store's key")

// adoptKey gives a replica the store's key, which names the chunks both
// hold. A replica that holds chunks named with another key is refused.
// The caller holds the replica's exclusive lock.
func (s *Store) adoptKey(src *Store) error {
	key, err := src.keyed()
	if err != nil {
		return err
	}
	err = s.adoptKeyValue(key)
	if errors.Is(err, ErrKeyMismatch) {
		err = fmt.Errorf("%w (is it the replica of another store?)", err)
	}
	return err
}

// adoptKeyValue makes key the key of s's chunk names: a store without
// chunks or generations takes it (a format-1 store is upgraded), one whose
// chunks are named with another key is refused with ErrKeyMismatch. The
// caller holds s's exclusive lock.
func (s *Store) adoptKeyValue(key [32]byte) error {
	if s.Format() >= 2 && s.pageKey() == key {
		return nil
	}
	gens, err := s.Generations()
	if err != nil {
		return err
	}
	ix, err := s.index()
	if err != nil {
		return err
	}
	if s.Format() >= 2 && (len(gens) > 0 || len(ix.list()) > 0) {
		return ErrKeyMismatch
	}
	s.metaMu.Lock()
	m := s.meta
	s.metaMu.Unlock()
	m.Format, m.Key = storeFormat, hex.EncodeToString(key[:])
	return s.writeMeta(m)
}

func (r *replicaWriter) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = fmt.Errorf("replica %s: %w", r.dst.Dir, err)
	}
}

func (r *replicaWriter) failed() bool {
	if r == nil {
		return true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err != nil
}

// put stores a record that was just appended to the primary, with the
// same bytes.
func (r *replicaWriter) put(rec record, z []byte) {
	if r.failed() {
		return
	}
	if _, err := r.pw.append(rec, z); err != nil {
		r.fail(err)
		return
	}
	r.count(int64(len(z)))
}

// have makes sure the replica holds a chunk that the primary already had:
// it copies the primary's blobs (and a delta's base) when the replica
// lacks them, after checking them. It returns false when the primary's
// copy is damaged, for the writer to store the chunk afresh in both.
func (r *replicaWriter) have(c Chunk) bool {
	if r.failed() {
		return true
	}
	hb, _ := hashBytes(c.Hash)
	if len(r.ix.lookup(hb)) > 0 {
		return true
	}
	var dst []blobRec
	err := r.src.exportChunk(c, 3, func(rec record, z []byte) error {
		dst = append(dst, blobRec{rec, z})
		return nil
	})
	if err != nil {
		return false
	}
	for _, b := range dst {
		if b.rec.hash != hb && len(r.ix.lookup(b.rec.hash)) > 0 {
			continue // a base the replica has
		}
		r.put(b.rec, b.z)
	}
	return true
}

type blobRec struct {
	rec record
	z   []byte
}

// exportChunk finds a copy of chunk c that checks out and calls fn with
// the records that make it: for a delta its base first.
func (s *Store) exportChunk(c Chunk, format int, fn func(rec record, z []byte) error) error {
	hb, ok := hashBytes(c.Hash)
	if !ok {
		return fmt.Errorf("chunk name %.80q", c.Hash)
	}
	ix, err := s.currentIndex()
	if err != nil {
		return err
	}
	locs := ix.lookup(hb)
	if len(locs) == 0 {
		if format >= 3 {
			return errMissing
		}
		// A chunk file of a format-1 store: its bytes are a full blob.
		var z []byte
		err := s.readChunkFile(legacyRel(c.Hash), func(b []byte) error {
			if _, err := decodeChunk(b, c, nil, false, s.verifier(format)); err != nil {
				return err
			}
			z = append([]byte(nil), b...)
			return nil
		})
		if errors.Is(err, fs.ErrNotExist) {
			return errMissing
		}
		if err != nil {
			return err
		}
		return fn(record{kind: kindFull, hash: hb, n: uint32(c.Len)}, z)
	}
	var errs []error
	for _, l := range locs {
		if c.Check == "" {
			c.Check = checkString(l.check)
		}
		if _, err := s.decodeLoc(l, c, nil, false, format); err != nil {
			errs = append(errs, err)
			continue
		}
		if l.kind == kindDelta && !l.zeroBase {
			base := Chunk{Hash: hex.EncodeToString(l.base[:]), Len: int64(l.n)}
			if err := s.exportChunk(base, 3, fn); err != nil {
				errs = append(errs, fmt.Errorf("its base: %w", err))
				continue
			}
		}
		if err := s.exportBlob(l, fn); err != nil {
			errs = append(errs, err)
			continue
		}
		return nil
	}
	return errors.Join(errs...)
}

// exportBlob calls fn with the record at l and its bytes, if they check.
func (s *Store) exportBlob(l blobLoc, fn func(rec record, z []byte) error) error {
	var z []byte
	err := s.readBlob(l, func(b []byte) error {
		if fileCheckBits(b) != l.check {
			return errors.New("fails its check")
		}
		z = append([]byte(nil), b...)
		return nil
	})
	if err != nil {
		return err
	}
	return fn(l.record, z)
}

func (r *replicaWriter) count(n int64) {
	r.mu.Lock()
	r.newChunks++
	r.newBytes += n
	r.mu.Unlock()
}

// nextGen returns the generation number to commit: gen, or past the
// replica's newest generation if that is higher, so that both agree.
func (r *replicaWriter) nextGen(gen int) int {
	if r.failed() {
		return gen
	}
	gens, err := r.dst.Generations()
	if err != nil {
		r.fail(err)
		return gen
	}
	if n := len(gens); n > 0 && gens[n-1] >= gen {
		return gens[n-1] + 1
	}
	return gen
}

// commit makes the replica's copy durable and visible: its packs, then the
// manifest, then the rename. It returns an error only when the replica is
// required; otherwise a failure is kept for ReplicaErr.
func (r *replicaWriter) commit(gen int, manifest []byte) error {
	if r == nil {
		return nil
	}
	if !r.failed() {
		if err := r.commitNow(gen, manifest); err != nil {
			r.fail(err)
		}
	}
	if r.failed() {
		r.abort()
	}
	if r.required && r.failed() {
		return fmt.Errorf("the replica is required: %w", r.error())
	}
	return nil
}

func (r *replicaWriter) commitNow(gen int, manifest []byte) error {
	if err := r.pw.finish(); err != nil {
		return err
	}
	if err := r.dst.r.writeFileAtomic(r.staging+"/manifest.json", manifest); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	if r.dst.r.exists(genRel(gen)) {
		return fmt.Errorf("it already has a generation %d (is it the replica of another store?)", gen)
	}
	if err := r.dst.r.rename(r.staging, genRel(gen)); err != nil {
		return fmt.Errorf("commit generation %d: %w", gen, err)
	}
	r.staging = ""
	if err := r.dst.r.syncDir("checkpoints"); err != nil {
		return err
	}
	r.mu.Lock()
	r.committed = true
	r.mu.Unlock()
	return nil
}

func (r *replicaWriter) abort() {
	if r == nil {
		return
	}
	r.pw.abort()
	if r.staging == "" {
		return
	}
	_ = r.dst.r.removeAll(r.staging)
	r.staging = ""
}

func (r *replicaWriter) error() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// ReplicaErr says why the replica did not receive the generation (nil: it
// did, or there is no replica). After a successful Commit with a non-nil
// ReplicaErr, the generation is committed in the store only.
func (w *Writer) ReplicaErr() error {
	if w.rep == nil {
		return nil
	}
	return w.rep.error()
}

// ReplicaStats are the chunks and compressed bytes written to the replica.
func (w *Writer) ReplicaStats() (chunks int, bytes int64) {
	if w.rep == nil {
		return 0, 0
	}
	w.rep.mu.Lock()
	defer w.rep.mu.Unlock()
	return w.rep.newChunks, w.rep.newBytes
}

// healer replaces damaged chunks of a store with verified copies from a
// replica, each chunk once however many files share it. The copies go into
// a pack of their own (the damaged ones stay until GC finds them
// unreadable, or repacks them away): readers try every copy of a chunk.
type healer struct {
	s, from *Store
	format  int
	mu      sync.Mutex
	pw      *packWriter
	done    map[string]error // hash -> outcome of its heal
	fixed   []Problem
}

func newHealer(s, from *Store, format int) *healer {
	return &healer{s: s, from: from, format: format, done: map[string]error{}}
}

// heal is a healFunc: it reads the chunk from the replica, verifies it,
// writes it into the store and returns its content.
func (h *healer) heal(j job, name string, buf []byte, why error) ([]byte, error) {
	p := Problem{File: name, Chunk: j.idx, Offset: j.off, Hash: j.c.Hash, Path: h.s.ChunkLocation(j.c.Hash)}
	h.mu.Lock()
	err, seen := h.done[j.c.Hash]
	h.mu.Unlock()
	var data []byte
	switch {
	case seen && err != nil:
		return buf, err
	default:
		if data, err = h.fetch(j.c, buf); err != nil {
			err = fmt.Errorf("%v; the replica's copy cannot heal it: %v", why, err)
		}
		h.mu.Lock()
		h.done[j.c.Hash] = err
		h.mu.Unlock()
		if err != nil {
			return data, err
		}
		if seen {
			return data, nil // healed already, for another file that shares it
		}
	}
	p.Reason = fmt.Sprintf("%v; restored from the replica", why)
	h.mu.Lock()
	h.fixed = append(h.fixed, p)
	h.mu.Unlock()
	return data, nil
}

func (h *healer) fetch(c Chunk, buf []byte) ([]byte, error) {
	data, err := h.from.readChunk(c, buf, false, h.format)
	if err != nil {
		if errors.Is(err, errMissing) {
			return buf, errors.New("missing there too")
		}
		return data, err
	}
	h.mu.Lock()
	if h.pw == nil {
		h.pw = h.s.newPackWriter()
	}
	pw := h.pw
	h.mu.Unlock()
	err = h.from.exportChunk(c, h.format, func(rec record, z []byte) error {
		_, err := pw.append(rec, z)
		return err
	})
	return data, err
}

// finish makes the healed chunks durable and readable from the store.
func (h *healer) finish() error {
	h.mu.Lock()
	pw := h.pw
	h.mu.Unlock()
	return pw.finish()
}

// list returns the chunks healed so far, one entry per file that uses one.
func (h *healer) list() []Problem {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Problem(nil), h.fixed...)
}

// MaterializeFrom is Materialize that heals a damaged or missing chunk from
// the replica (when not nil): the replica's copy is verified, written into
// this store and used. It returns the chunks it healed; what could not be
// healed is in the *CorruptError as with Materialize. The caller holds at
// least the shared lock of both stores.
func (s *Store) MaterializeFrom(ctx context.Context, m *Manifest, dir string, replica *Store, kinds ...string) ([]Problem, error) {
	if replica == nil {
		return nil, s.Materialize(ctx, m, dir, kinds...)
	}
	h := newHealer(s, replica, m.Format)
	err := s.materialize(ctx, m, dir, h.heal, kinds)
	return h.list(), errors.Join(err, h.finish())
}

// HealManifest replaces generation gen's damaged or missing manifest with
// the replica's, which must check out, and returns it. The generation's
// directory must exist (a generation the store never had is not healed
// here; Repair copies those). The caller holds at least the shared lock.
func (s *Store) HealManifest(replica *Store, gen int) (*Manifest, error) {
	if !s.r.exists(genRel(gen)) {
		return nil, fmt.Errorf("%w: %d in %s", ErrNoGeneration, gen, s.Dir)
	}
	return s.copyManifest(replica, gen)
}

func (s *Store) copyManifest(replica *Store, gen int) (*Manifest, error) {
	m, err := replica.ReadManifest(gen)
	if err != nil {
		return nil, fmt.Errorf("the replica cannot heal it: %w", err)
	}
	b, err := replica.manifestBytes(gen)
	if err != nil {
		return nil, err
	}
	if err := s.r.mkdirAll(genRel(gen)); err != nil {
		return nil, err
	}
	if err := s.r.writeFileAtomic(genRel(gen)+"/manifest.json", b); err != nil {
		return nil, fmt.Errorf("write manifest of generation %d: %w", gen, err)
	}
	if err := s.r.syncDir("checkpoints"); err != nil {
		return nil, err
	}
	return m, nil
}

// RepairResult says what Repair did to one generation.
type RepairResult struct {
	Generation int `json:"generation"`
	// Manifest says what was done to the manifest: "" (it was fine),
	// "restored from the replica" or "copied from the replica" (the store
	// lacked the whole generation).
	Manifest string    `json:"manifest,omitempty"`
	Fixed    []Problem `json:"fixed,omitempty"`  // chunks healed from the replica
	Broken   []Problem `json:"broken,omitempty"` // what stays damaged
	Intact   bool      `json:"intact"`           // the generation verifies now
}

// Repair verifies generation gen of s and heals every damaged or missing
// chunk, and a damaged manifest, from replica, verifying each copy before
// it writes it. A generation that s lacks but the replica holds is copied
// in. The caller holds s's exclusive lock and the replica's shared lock.
func (s *Store) Repair(ctx context.Context, replica *Store, gen int) RepairResult {
	res := RepairResult{Generation: gen}
	m, err := s.ReadManifest(gen)
	switch {
	case err == nil:
	case errors.Is(err, ErrNoGeneration):
		if m, err = s.copyManifest(replica, gen); err == nil {
			res.Manifest = "copied from the replica"
		}
	case errors.Is(err, ErrCorrupt):
		if rm, rerr := s.copyManifest(replica, gen); rerr == nil {
			m, err, res.Manifest = rm, nil, "restored from the replica"
		} else {
			err = fmt.Errorf("%w; %v", err, rerr)
		}
	}
	if err != nil {
		res.Broken = []Problem{{File: "manifest.json", Chunk: -1, Path: filepath.Join(s.GenDir(gen), "manifest.json"), Reason: err.Error()}}
		return res
	}
	h := newHealer(s, replica, m.Format)
	res.Broken = s.walkHealing(ctx, m, nil, true, h.heal, func(job, []byte) error { return nil })
	res.Fixed = h.list()
	if err := h.finish(); err != nil {
		res.Broken = append(res.Broken, Problem{Chunk: -1, Path: s.Dir, Reason: err.Error()})
	}
	res.Intact = len(res.Broken) == 0
	return res
}
