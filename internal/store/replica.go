package store

// A replica is a second store (another disk, a partner node's mount) that
// holds byte-identical copies of a store's chunks and manifests, so that
// damage to one can be healed from the other. It is itself a valid store:
// list, verify and restore work on it directly.
//
// Writing. A Writer with WriterOptions.Replica writes every new chunk to
// both stores from the same compressed bytes (nothing is compressed or read
// twice), and copies a chunk the store already has but the replica lacks
// after checking it. Commit syncs both file systems, commits the replica's
// manifest, and only then the store's: once the store shows a generation,
// its replica copy is durable. A crash between the two leaves a complete
// generation in the replica that the store lacks, which is harmless; the
// next generation is numbered past both, so the numbers never diverge.
//
// Failure. A replica that cannot be written (missing mount, full disk) does
// not cost the checkpoint: the writer stops replicating, commits the store
// alone and reports the replica's error (Writer.ReplicaErr), unless
// ReplicaRequired makes it fail the commit.
//
// Healing. Chunks are named by the hash of their content, so replacing a
// damaged chunk file with verified content from the replica (an atomic
// rename) is safe even while others read the store: they see the damaged
// file or the good one. Repair heals a generation under the exclusive lock;
// MaterializeFrom heals what a restore trips over under the shared lock.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// replicaWriter is a Writer's replica side. Its methods are safe on a nil
// receiver (no replica) and after a failure (they do nothing).
type replicaWriter struct {
	src, dst *Store
	required bool
	staging  string

	mu        sync.Mutex
	err       error
	committed bool
	newChunks int
	newBytes  int64
}

func newReplicaWriter(src, dst *Store, required bool) *replicaWriter {
	r := &replicaWriter{src: src, dst: dst, required: required}
	staging, err := os.MkdirTemp(filepath.Join(dst.Dir, "staging"), "gen-")
	if err != nil {
		r.fail(fmt.Errorf("create staging: %w", err))
	}
	r.staging = staging
	return r
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

// put stores a chunk that was just compressed for the primary.
func (r *replicaWriter) put(c Chunk, z []byte) {
	if r.failed() {
		return
	}
	path := r.dst.ChunkPath(c.Hash)
	if st, err := os.Stat(path); err == nil && st.Size() == int64(len(z)) {
		return
	}
	if err := r.dst.writeChunk(path, z); err != nil {
		r.fail(err)
		return
	}
	r.count(int64(len(z)))
}

// have makes sure the replica holds a chunk that the primary already had
// (c.Stored is the primary file's size): it copies the primary's file when
// the replica lacks it (or holds a different size), after checking that
// the file decodes to b. A primary file that does not is damaged: both get
// b freshly compressed, which heals the primary too. It returns the
// primary file's size.
func (r *replicaWriter) have(cd *coder, c Chunk, b []byte) int64 {
	if r.failed() {
		return c.Stored
	}
	path := r.dst.ChunkPath(c.Hash)
	if st, err := os.Stat(path); err == nil && st.Size() == c.Stored {
		return c.Stored
	}
	z, err := os.ReadFile(r.src.ChunkPath(c.Hash))
	if err == nil {
		_, err = decodeChunk(z, c, nil, false)
	}
	if err != nil {
		z = cd.compress(b)
		if werr := r.src.writeChunk(r.src.ChunkPath(c.Hash), z); werr != nil {
			r.fail(fmt.Errorf("chunk %s is damaged in the store and cannot be rewritten: %w", c.Hash, werr))
			return c.Stored
		}
	}
	if err := r.dst.writeChunk(path, z); err != nil {
		r.fail(err)
		return int64(len(z))
	}
	r.count(int64(len(z)))
	return int64(len(z))
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

// commit makes the replica's copy durable and visible: syncfs, then the
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
	if err := syncFS(r.dst.Dir); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(r.staging, "manifest.json"), manifest); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	dir := r.dst.GenDir(gen)
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("it already has a generation %d (is it the replica of another store?)", gen)
	}
	if err := os.Rename(r.staging, dir); err != nil {
		return fmt.Errorf("commit generation %d: %w", gen, err)
	}
	r.staging = ""
	if err := syncDir(filepath.Join(r.dst.Dir, "checkpoints")); err != nil {
		return err
	}
	r.mu.Lock()
	r.committed = true
	r.mu.Unlock()
	return nil
}

func (r *replicaWriter) abort() {
	if r == nil || r.staging == "" {
		return
	}
	os.RemoveAll(r.staging)
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
// replica, each chunk once however many files share it.
type healer struct {
	s, from *Store
	mu      sync.Mutex
	done    map[string]error // hash -> outcome of its heal
	fixed   []Problem
}

func newHealer(s, from *Store) *healer {
	return &healer{s: s, from: from, done: map[string]error{}}
}

// heal is a healFunc: it reads the chunk from the replica, verifies it,
// writes it into the store and returns its content.
func (h *healer) heal(j job, name string, buf []byte, why error) ([]byte, error) {
	p := Problem{File: name, Chunk: j.idx, Offset: j.off, Hash: j.c.Hash, Path: h.s.ChunkPath(j.c.Hash)}
	h.mu.Lock()
	err, seen := h.done[j.c.Hash]
	h.mu.Unlock()
	var data []byte
	switch {
	case seen && err != nil:
		return buf, err
	case seen:
		// Healed for another file that shares it.
		if data, err = h.s.readChunk(j.c, buf, false); err != nil {
			return data, err
		}
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
	}
	p.Reason = fmt.Sprintf("%v; restored from the replica", why)
	h.mu.Lock()
	h.fixed = append(h.fixed, p)
	h.mu.Unlock()
	return data, nil
}

func (h *healer) fetch(c Chunk, buf []byte) ([]byte, error) {
	z, err := os.ReadFile(h.from.ChunkPath(c.Hash))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return buf, errors.New("missing there too")
		}
		return buf, err
	}
	data, err := decodeChunk(z, c, buf, false)
	if err != nil {
		return data, err
	}
	if err := h.s.writeChunk(h.s.ChunkPath(c.Hash), z); err != nil {
		return data, err
	}
	return data, nil
}

// finish makes the healed chunks durable.
func (h *healer) finish() error {
	h.mu.Lock()
	n := len(h.fixed)
	h.mu.Unlock()
	if n == 0 {
		return nil
	}
	return syncFS(h.s.Dir)
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
	h := newHealer(s, replica)
	err := s.materialize(ctx, m, dir, h.heal, kinds)
	return h.list(), errors.Join(err, h.finish())
}

// HealManifest replaces generation gen's damaged or missing manifest with
// the replica's, which must check out, and returns it. The generation's
// directory must exist (a generation the store never had is not healed
// here; Repair copies those). The caller holds at least the shared lock.
func (s *Store) HealManifest(replica *Store, gen int) (*Manifest, error) {
	if _, err := os.Stat(s.GenDir(gen)); err != nil {
		return nil, fmt.Errorf("%w: %d in %s", ErrNoGeneration, gen, s.Dir)
	}
	return s.copyManifest(replica, gen)
}

func (s *Store) copyManifest(replica *Store, gen int) (*Manifest, error) {
	m, err := replica.ReadManifest(gen)
	if err != nil {
		return nil, fmt.Errorf("the replica cannot heal it: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(replica.GenDir(gen), "manifest.json"))
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(s.GenDir(gen), dirMode); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(s.GenDir(gen), "manifest.json"), b); err != nil {
		return nil, fmt.Errorf("write manifest of generation %d: %w", gen, err)
	}
	if err := syncDir(filepath.Join(s.Dir, "checkpoints")); err != nil {
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
	h := newHealer(s, replica)
	res.Broken = s.walkHealing(ctx, m, nil, true, h.heal, func(job, []byte) error { return nil })
	res.Fixed = h.list()
	if err := h.finish(); err != nil {
		res.Broken = append(res.Broken, Problem{Chunk: -1, Path: s.Dir, Reason: err.Error()})
	}
	res.Intact = len(res.Broken) == 0
	return res
}
