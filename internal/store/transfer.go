package store

// Sending generations to a standby node. A standby keeps a store that
// mirrors a source store's generations across the network, so that when
// the source's node dies the job restores there, and each new generation
// costs the transfer of its new chunks only. It is the replica (replica.go)
// across a message boundary: the source exports stored records as they are
// in its packs, and the standby imports them into its own packs, under
// the source's key and generation numbers. The transport (an authenticated
// message stream) is the caller's; this file is the store's side of it.
//
//	source                                      standby
//	KeyHex                              ->      NewImporter(key)
//	GenerationChunks(m)                 ->      Missing(names)
//	                                    <-      the names it lacks
//	ExportBlob(name) for each           ->      Put(header, blob)
//	ManifestBytes(gen)                  ->      Commit(manifest)
//	the generations it keeps            ->      Retain(keep), GC
//
// Nothing the standby receives is trusted: a record's header is bounded
// and checked, its blob's length and CRCs must match the header, and Put
// decompresses the blob and hashes its content with the key before it
// appends it (a delta applied to its base first). Checking at Put rather
// than at Commit costs the standby a decompression and a hash per new
// chunk (measured here: 2.6 GB/s of content on one core, for the mix of
// raw, shuffled and compressed chunks of a job's memory; Put may be called
// from several goroutines), but nothing that does not match its name ever
// reaches a pack: a chunk in a pack is taken as its name says by every
// later generation that names it (Missing does not ask for it again), so
// checking it only when this generation commits would be too late for the
// next. Commit then commits the source's manifest, byte for byte, once
// every chunk it names is in the store.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
)

const (
	// ExportHeaderLen is the length of the header ExportBlob gives and Put
	// takes: a pack record's header (pack.go).
	ExportHeaderLen = recHeader
	// MaxExportBlob bounds the blob that follows a header: a transport can
	// size its frames and buffers by it, and refuses anything longer.
	MaxExportBlob = maxStored
)

var (
	// ErrIncomplete means a generation needs chunks that the receiving
	// store does not hold (Importer.Commit), or a delta came before its
	// base (Importer.Put): send what is missing and try again.
	ErrIncomplete = errors.New("chunks are missing")
	// ErrDiverged means the standby holds a generation of that number
	// with another manifest than the source's: it mirrors another history.
	ErrDiverged = errors.New("the standby holds another generation of that number")
)

// GenerationChunks lists, once each, the names of the chunks a store needs
// to read every file of generation m: m's chunks and the base of each that
// is stored as a delta (delta.go), every base before any other chunk. A
// receiver that adds them in this order (Importer.Put) can check each delta
// against its base as it arrives. Zero chunks have no name and are not
// listed. It reads the store's index (reloading it) and no chunk: a chunk
// that no pack holds is an error (ErrCorrupt), found before anything is
// sent. A chunk stored more than once, as a whole chunk and as a delta,
// lists the base of the delta too, in case its whole copy turns out to be
// damaged when ExportBlob reads it. Manifests of formats before 3 (chunks
// named by SHA-256, maybe in format-1 chunk files) are refused: a standby
// takes what this cryo writes. The caller holds at least the shared lock.
func (s *Store) GenerationChunks(m *Manifest) ([]string, error) {
	if m.Format < 3 {
		return nil, fmt.Errorf("generation %d has manifest format %d; only generations of format 3 and later (this cryo's) can be sent to a standby", m.Generation, m.Format)
	}
	ix, err := s.index()
	if err != nil {
		return nil, fmt.Errorf("read the pack index of %s: %w", s.Dir, err)
	}
	seen := map[[32]byte]bool{}
	isBase := map[[32]byte]bool{}
	var bases, chunks []string
	for _, f := range m.Files {
		for i, c := range f.Chunks {
			if c.Zero {
				continue
			}
			hb, ok := hashBytes(c.Hash)
			if !ok {
				return nil, fmt.Errorf("%w: generation %d: %.200s: chunk %d is named %.80q", ErrCorrupt, m.Generation, f.Name, i, c.Hash)
			}
			if seen[hb] {
				continue
			}
			seen[hb] = true
			locs := ix.lookup(hb)
			if len(locs) == 0 {
				return nil, fmt.Errorf("%w: generation %d: %.200s: chunk %d (%s) is in no pack of %s", ErrCorrupt, m.Generation, f.Name, i, c.Hash, s.Dir)
			}
			whole := slices.ContainsFunc(locs, func(l blobLoc) bool { return l.kind == kindFull })
			for _, l := range locs {
				if l.kind != kindDelta || l.zeroBase || isBase[l.base] {
					continue
				}
				if whole && !hasFull(ix, l.base, l.n) {
					continue // not needed, and not there to send
				}
				isBase[l.base] = true
				bases = append(bases, hex.EncodeToString(l.base[:]))
			}
			chunks = append(chunks, c.Hash)
		}
	}
	out := bases
	for _, h := range chunks {
		if hb, _ := hashBytes(h); !isBase[hb] {
			out = append(out, h)
		}
	}
	return out, nil
}

// ExportBlob calls fn once with the stored record of the chunk named name,
// as a pack holds it: header is the record's header (ExportHeaderLen
// bytes: kind, name, base, lengths, CRCs), blob its stored bytes (at most
// MaxExportBlob). Both are valid only during fn, which must copy what it
// keeps. The blob's CRCs are checked first: a damaged copy is never
// exported, the next copy is tried (whole chunks before deltas, so that a
// chunk that is also a base goes whole), and when none checks out the
// error wraps ErrCorrupt. An error of fn is returned as it is, and no
// other copy is tried. The content is not decompressed here; the receiver
// checks it. The caller holds at least the shared lock.
func (s *Store) ExportBlob(name string, fn func(header, blob []byte) error) error {
	hb, ok := hashBytes(name)
	if !ok || !validHash(name) {
		return fmt.Errorf("chunk name %.80q is not a chunk name", name)
	}
	ix, err := s.currentIndex()
	if err != nil {
		return err
	}
	locs := ix.lookup(hb)
	if len(locs) == 0 {
		// Packs another process wrote since the index was loaded.
		if ix, err = s.index(); err != nil {
			return err
		}
		locs = ix.lookup(hb)
	}
	if len(locs) == 0 {
		return fmt.Errorf("%w: chunk %s is in no pack of %s", ErrCorrupt, name, s.Dir)
	}
	locs = slices.Clone(locs)
	slices.SortStableFunc(locs, func(a, b blobLoc) int { return cmp.Compare(a.kind, b.kind) }) // kindFull first
	var hdr [recHeader]byte
	var errs []error
	for _, l := range locs {
		called := false
		var fnErr error
		err := s.readBlob(l, func(z []byte) error {
			if fileCheckBits(z) != l.check {
				return errors.New("its blob fails its CRCs")
			}
			l.record.encode(hdr[:])
			called = true
			fnErr = fn(hdr[:], z)
			return nil
		})
		if called {
			return fnErr
		}
		errs = append(errs, fmt.Errorf("%s: %w", s.r.pathOf(l.where()), err))
	}
	return fmt.Errorf("%w: chunk %s: no copy checks out: %w", ErrCorrupt, name, errors.Join(errs...))
}

// ManifestBytes returns the manifest of committed generation gen byte for
// byte as stored, after checking it as ReadManifest does (ErrNoGeneration,
// ErrCorrupt): a receiver commits these very bytes. It is at most
// MaxManifest bytes. The caller holds at least the shared lock.
func (s *Store) ManifestBytes(gen int) ([]byte, error) {
	if _, err := s.ReadManifest(gen); err != nil {
		return nil, err
	}
	b, err := s.manifestBytes(gen)
	if err != nil {
		return nil, fmt.Errorf("%w: generation %d: %v", ErrCorrupt, gen, err)
	}
	return b, nil
}

// KeyHex returns the key that names the store's chunks (64 hex digits),
// which a standby must adopt (NewImporter) to hold the same names. It is
// secret to whoever can read the store (digest.go): send it only over an
// authenticated, encrypted channel, and never log it. A format-1 store has
// no key, and no generation a standby can take.
func (s *Store) KeyHex() (string, error) {
	if s.Format() < 2 {
		return "", fmt.Errorf("store %s has format 1: its chunks are not named with a key (a checkpoint by this cryo upgrades it)", s.Dir)
	}
	k := s.pageKey()
	return hex.EncodeToString(k[:]), nil
}

// ExportedBlobLen checks an exported record's header as Put does and
// returns the length of the blob that follows it (at most MaxExportBlob),
// for a transport that frames the header and blob itself. A header that is
// not one is refused with ErrCorrupt.
func ExportedBlobLen(header []byte) (int, error) {
	r, err := parseExported(header)
	if err != nil {
		return 0, err
	}
	return int(r.z), nil
}

// parseExported decodes a record header received from another store and
// checks that it is well formed: its length, magic and CRC, a known kind,
// lengths within a chunk's bounds, no flag or reserved byte this cryo does
// not write.
func parseExported(header []byte) (record, error) {
	if len(header) != recHeader {
		return record{}, fmt.Errorf("%w: a record header of %d bytes, not %d", ErrCorrupt, len(header), recHeader)
	}
	r, err := decodeRecord(header)
	if err != nil {
		return r, fmt.Errorf("%w: received record: %v", ErrCorrupt, err)
	}
	bad := ""
	switch {
	case header[5]&^flagZeroBase != 0 || header[6] != 0 || header[7] != 0 || !isZero(header[92:96]):
		bad = "flags or reserved bytes this cryo does not write"
	case r.kind == kindFull && (r.zeroBase || r.base != [32]byte{}):
		bad = "a whole chunk with a base"
	case r.kind == kindDelta && r.zeroBase && r.base != [32]byte{}:
		bad = "a delta on zeros that names a base"
	case r.kind == kindDelta && r.base == r.hash:
		bad = "a delta on itself"
	case r.n == 0 || r.z == 0:
		bad = "an empty chunk or blob"
	}
	if bad != "" {
		return r, fmt.Errorf("%w: received record of chunk %x: %s", ErrCorrupt, r.hash, bad)
	}
	return r, nil
}

// Importer receives generations from another store (the source) into a
// standby store s: records that Put checks and appends to its own packs,
// and manifests that Commit commits under the source's generation numbers.
// It holds s's exclusive lock from NewImporter to Close. Put may be called
// from several goroutines at once; Missing, Commit, Retain, GC and Close
// must not run while a Put does. After an error from a pack write (a full
// disk) every call fails with it; Close is still needed.
type Importer struct {
	s      *Store
	unlock func()
	key    [32]byte

	// flush is held shared by appends and exclusively while the packs are
	// finished and pw replaced.
	flush sync.RWMutex
	pw    *packWriter

	mu          sync.Mutex
	pending     map[[32]byte]uint8 // records appended to pw, not yet in s's index: kind
	uncommitted int                // records appended since the last commit
	stats       ImportStats
	err         error // sticky: a pack could not be written
	closed      bool
}

// ImportStats count what an Importer appended to the store.
type ImportStats struct {
	Chunks int   `json:"chunks"` // records appended (whole chunks and deltas)
	Bytes  int64 `json:"bytes"`  // their blobs' bytes
	Packs  int   `json:"packs"`  // pack files finished
}

// NewImporter prepares s to receive generations of a source store whose
// chunk names are keyed with key (64 hex digits, KeyHex). It takes s's
// exclusive lock, waiting as LockWithin does (until ctx is done or
// DefaultLockWait has passed: ErrLocked), and holds it until Close. A
// store with no chunks and no generations adopts the key; one whose chunks
// are named with another key is refused with ErrKeyMismatch (a standby
// for another source, or of an earlier run of the job: empty it first).
// Staging debris and unfinished packs of a killed writer are removed.
// On error the lock is released and nothing is changed but the key.
func (s *Store) NewImporter(ctx context.Context, key string) (*Importer, error) {
	kb, err := hex.DecodeString(key)
	if err != nil || len(kb) != 32 {
		// Never the key itself in a message: it is a secret.
		return nil, fmt.Errorf("the source's key is not 64 hex digits (%d characters)", len(key))
	}
	unlock, err := s.LockWithin(ctx, true, 0)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Importer, error) {
		unlock()
		return nil, err
	}
	if err := s.adoptKeyValue([32]byte(kb)); err != nil {
		return fail(fmt.Errorf("standby store %s: %w", s.Dir, err))
	}
	if _, err := s.CleanStaging(); err != nil {
		return fail(fmt.Errorf("standby store %s: clean staging: %w", s.Dir, err))
	}
	if _, err := s.index(); err != nil {
		return fail(fmt.Errorf("standby store %s: read the pack index: %w", s.Dir, err))
	}
	return &Importer{s: s, unlock: unlock, key: [32]byte(kb), pw: s.newPackWriter(), pending: map[[32]byte]uint8{}}, nil
}

func (im *Importer) usable() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errors.New("the importer is closed")
	}
	return im.err
}

// Missing returns, in their order and once each, those of names that the
// store does not hold: not in any pack, nor Put since, nor held only as a
// delta whose base is absent. It reads the index, no chunk: a chunk that
// is there but damaged counts as held (cryo verify and repair find it).
func (im *Importer) Missing(names []string) ([]string, error) {
	if err := im.usable(); err != nil {
		return nil, err
	}
	ix, err := im.s.currentIndex()
	if err != nil {
		return nil, err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	seen := make(map[[32]byte]bool, len(names))
	var out []string
	for _, n := range names {
		hb, ok := hashBytes(n)
		if !ok || !validHash(n) {
			return nil, fmt.Errorf("chunk name %.80q is not a chunk name", n)
		}
		if seen[hb] {
			continue
		}
		seen[hb] = true
		if !im.holdsLocked(ix, hb) {
			out = append(out, n)
		}
	}
	return out, nil
}

// holdsLocked says whether the store holds chunk h, as Missing counts.
// im.mu is held.
func (im *Importer) holdsLocked(ix *packIndex, h [32]byte) bool {
	if _, ok := im.pending[h]; ok {
		return true
	}
	for _, l := range ix.lookup(h) {
		if l.kind == kindFull || l.zeroBase || hasFull(ix, l.base, l.n) || im.pending[l.base] == kindFull {
			return true
		}
	}
	return false
}

// Put checks one record that the source exported (ExportBlob's header and
// blob) and appends it to the store's open pack. Received bytes are
// refused with ErrCorrupt, and nothing appended, when the header is not a
// well-formed record header (see ExportedBlobLen), the blob's length or
// CRCs differ from the header's, or the content it decompresses to (a
// delta applied to its base) is not what its name says under the key. A
// delta's base must be in the store already or have been Put before (the
// order of GenerationChunks); else the delta is refused with
// ErrIncomplete. A chunk the store holds already is not appended again.
// Put does not keep header or blob. What it appended becomes durable at
// Commit; until then a crash or Close loses it (at worst it stays,
// checked, in a pack no generation uses, which GC removes).
func (im *Importer) Put(header, blob []byte) error {
	r, err := parseExported(header)
	if err != nil {
		return err
	}
	if len(blob) != int(r.z) {
		return fmt.Errorf("%w: chunk %x: a blob of %d bytes, its header says %d", ErrCorrupt, r.hash, len(blob), r.z)
	}
	if fileCheckBits(blob) != r.check {
		return fmt.Errorf("%w: chunk %x: its blob fails its CRCs", ErrCorrupt, r.hash)
	}
	if err := im.usable(); err != nil {
		return err
	}
	ix, err := im.s.currentIndex()
	if err != nil {
		return err
	}
	im.mu.Lock()
	held := im.holdsLocked(ix, r.hash)
	basePending := r.kind == kindDelta && !r.zeroBase && im.pending[r.base] == kindFull
	im.mu.Unlock()
	if held {
		return nil
	}
	if basePending {
		// The base is in the pack being written, which no read sees: it
		// is finished first (once for the bases GenerationChunks sends
		// ahead of the deltas).
		if err := im.flushPacks(); err != nil {
			return err
		}
	}
	if err := im.verify(r, blob); err != nil {
		return err
	}
	im.flush.RLock()
	defer im.flush.RUnlock()
	im.mu.Lock()
	if im.closed || im.err != nil || im.holdsLocked(ix, r.hash) {
		err := im.err
		if im.closed {
			err = errors.New("the importer is closed")
		}
		im.mu.Unlock()
		return err
	}
	im.pending[r.hash] = r.kind
	im.mu.Unlock()
	_, err = im.pw.append(r, blob)
	im.mu.Lock()
	defer im.mu.Unlock()
	if err != nil {
		delete(im.pending, r.hash)
		im.err = fmt.Errorf("standby store %s: %w", im.s.Dir, err)
		return im.err
	}
	im.uncommitted++
	im.stats.Chunks++
	im.stats.Bytes += int64(len(blob))
	return nil
}

var importBufs = sync.Pool{New: func() any { b := make([]byte, 0, MaxChunk); return &b }}

// verify decompresses the blob of record r (a delta applied to its base,
// read from the store) and checks the content against r's name.
func (im *Importer) verify(r record, blob []byte) error {
	bp := importBufs.Get().(*[]byte)
	defer importBufs.Put(bp)
	data, err := decodeFrame(blob, (*bp)[:0])
	*bp = data[:0]
	if err != nil {
		return fmt.Errorf("%w: chunk %x: its blob cannot be decompressed: %v", ErrCorrupt, r.hash, err)
	}
	content := data
	if r.kind == kindDelta {
		base := importBufs.Get().(*[]byte)
		defer importBufs.Put(base)
		if r.zeroBase {
			content = append((*base)[:0], zeros[:r.n]...)
		} else {
			content, err = im.s.readBase(r.base, int(r.n), (*base)[:0])
			if errors.Is(err, errMissing) {
				return fmt.Errorf("%w: chunk %x is a delta on %x, which the store lacks: send bases first (GenerationChunks' order)", ErrIncomplete, r.hash, r.base)
			}
			if err != nil {
				return fmt.Errorf("chunk %x: its base %x in %s: %w", r.hash, r.base, im.s.Dir, err)
			}
		}
		*base = content[:0]
		if err := applyDelta(content, data); err != nil {
			return fmt.Errorf("%w: chunk %x: %v", ErrCorrupt, r.hash, err)
		}
	}
	if len(content) != int(r.n) {
		return fmt.Errorf("%w: chunk %x: holds %d bytes, its header says %d", ErrCorrupt, r.hash, len(content), r.n)
	}
	var sum [32]byte
	x := newHasher(im.key)
	x.h.Write(content)
	x.h.Sum(sum[:0])
	if sum != r.hash {
		return fmt.Errorf("%w: chunk %x: its content does not match its name", ErrCorrupt, r.hash)
	}
	return nil
}

// flushPacks finishes the packs written so far (durable, named, in the
// index) and starts a new pack writer. A failure sticks.
func (im *Importer) flushPacks() error {
	im.flush.Lock()
	defer im.flush.Unlock()
	err := im.pw.finish()
	finished := len(im.pw.finished)
	im.pw = im.s.newPackWriter()
	im.mu.Lock()
	defer im.mu.Unlock()
	clear(im.pending) // in the index now, or lost with the pack that failed
	im.stats.Packs += finished
	if err != nil && im.err == nil {
		im.err = fmt.Errorf("standby store %s: %w", im.s.Dir, err)
	}
	return im.err
}

// Commit commits a generation of the source: manifest is the source's
// manifest.json (ManifestBytes), at most MaxManifest bytes, parsed and
// checked as any manifest read from a store (its checksum, bounds, names)
// and refused with ErrCorrupt if it does not check out. First the packs
// written so far are made durable; then every chunk the manifest names
// must be in the store with the lengths the manifest records, a delta's
// base too (Quick), or nothing is committed and the error wraps
// ErrIncomplete (what was Put stays for another Commit). The generation
// keeps the source's number: if the store has a generation of that number
// already, Commit succeeds without change when its manifest is the same,
// byte for byte, and fails with ErrDiverged when not. The manifest is
// written to staging and renamed into checkpoints/ (the commit point), so
// a crash leaves the generation whole or absent. It returns the
// generation's number.
func (im *Importer) Commit(manifest []byte) (int, error) {
	if err := im.usable(); err != nil {
		return 0, err
	}
	if len(manifest) > MaxManifest {
		return 0, fmt.Errorf("%w: the source's manifest has %d bytes, more than the %d a store takes", ErrCorrupt, len(manifest), MaxManifest)
	}
	m, err := parseManifest(manifest)
	if err != nil {
		return 0, fmt.Errorf("%w: the source's manifest: %v", ErrCorrupt, err)
	}
	gen := m.Generation
	if m.Format < 3 {
		return 0, fmt.Errorf("the source's generation %d has manifest format %d; a standby takes format 3 and later", gen, m.Format)
	}
	if err := im.flushPacks(); err != nil {
		return 0, err
	}
	s := im.s
	if s.r.exists(genRel(gen)) {
		have, err := s.manifestBytes(gen)
		if err == nil && bytes.Equal(have, manifest) {
			im.committed()
			return gen, nil
		}
		why := "its manifest differs from the source's"
		if err != nil {
			why = fmt.Sprintf("its manifest cannot be read: %v", err)
		}
		return 0, fmt.Errorf("%w: generation %d of %s: %s (remove it to take the source's)", ErrDiverged, gen, s.Dir, why)
	}
	if ps := s.Quick(m); len(ps) > 0 {
		return 0, fmt.Errorf("%w: generation %d needs %d chunks that %s lacks or holds damaged; the first: %s", ErrIncomplete, gen, len(ps), s.Dir, ps[0])
	}
	staging := "staging/import-" + newPackID()[:16]
	if err := s.r.mkdirAll(staging); err != nil {
		return 0, fmt.Errorf("create staging: %w", err)
	}
	if err := s.r.writeFileAtomic(staging+"/manifest.json", manifest); err != nil {
		return 0, errors.Join(fmt.Errorf("write manifest of generation %d: %w", gen, err), s.r.removeAll(staging))
	}
	if err := s.r.rename(staging, genRel(gen)); err != nil {
		return 0, errors.Join(fmt.Errorf("commit generation %d: %w", gen, err), s.r.removeAll(staging))
	}
	if err := s.r.syncDir("checkpoints"); err != nil {
		return gen, err
	}
	im.committed()
	return gen, nil
}

func (im *Importer) committed() {
	im.mu.Lock()
	im.uncommitted = 0
	im.mu.Unlock()
}

// Retain removes the store's generations that keep does not list (the
// generations the source still has), newest ones included, and returns
// them; their chunks stay until GC. An empty keep removes every
// generation.
func (im *Importer) Retain(keep []int) ([]int, error) {
	if err := im.usable(); err != nil {
		return nil, err
	}
	gens, err := im.s.Generations()
	if err != nil {
		return nil, err
	}
	var removed []int
	for _, g := range gens {
		if slices.Contains(keep, g) {
			continue
		}
		if err := im.s.Remove(g); err != nil {
			return removed, err
		}
		removed = append(removed, g)
	}
	return removed, nil
}

// GC collects the store (Store.GC) under the importer's lock. It is
// refused while records Put since the last Commit are uncommitted: GC
// would remove them (or the pack being written) as unused.
func (im *Importer) GC() (GCResult, error) {
	if err := im.usable(); err != nil {
		return GCResult{}, err
	}
	im.mu.Lock()
	n := im.uncommitted
	im.mu.Unlock()
	if n > 0 {
		return GCResult{}, fmt.Errorf("standby store %s: %d chunks received are not committed yet: commit them, or close the importer, before collecting", im.s.Dir, n)
	}
	return im.s.GC()
}

// Stats counts what the importer appended so far.
func (im *Importer) Stats() ImportStats {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.stats
}

// Close ends the import: the pack being written is dropped (its .tmp file
// removed; packs already finished stay, checked but used by no generation,
// until GC), and the store's lock released. What Commit committed stays.
// Close is idempotent.
func (im *Importer) Close() error {
	im.flush.Lock()
	defer im.flush.Unlock()
	im.mu.Lock()
	if im.closed {
		im.mu.Unlock()
		return nil
	}
	im.closed = true
	im.mu.Unlock()
	im.pw.abort()
	im.unlock()
	return nil
}
