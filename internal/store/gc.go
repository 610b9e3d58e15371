package store

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
)

// GCResult says what GC removed and rewrote.
type GCResult struct {
	Chunks int   `json:"chunks"` // unreferenced chunks removed (in packs, or chunk files)
	Bytes  int64 `json:"bytes"`  // bytes freed
	Kept   int   `json:"kept"`   // chunks in use
	// PacksRemoved are the packs deleted: unreferenced, or repacked.
	PacksRemoved int `json:"packs_removed,omitempty"`
	// Repacked are the packs whose chunks in use were copied into new
	// packs (PacksWritten), and ChunkFiles the format-1 chunk files packed.
	Repacked     int `json:"packs_repacked,omitempty"`
	PacksWritten int `json:"packs_written,omitempty"`
	ChunkFiles   int `json:"chunk_files_packed,omitempty"`
	// Damaged are chunks in use whose only copies fail their checks: their
	// packs are kept as they are (cryo verify and repair say more).
	Damaged int `json:"damaged,omitempty"`
}

// GCOptions choose how far GC goes.
type GCOptions struct {
	// Repack rewrites every pack that holds any unreferenced byte and all
	// packs smaller than a quarter of the pack limit into new packs, and
	// packs every chunk file of a store written by an older cryo (store
	// format 1), which converts it. Without it, GC repacks only packs of
	// which less than RepackBelow is in use, and small packs once there
	// are more than mergeSmall of them.
	Repack bool
}

const (
	// RepackBelow is the share of a pack in use below which GC copies what
	// is in use into a new pack and deletes the old one.
	RepackBelow = 0.5
	// mergeSmall is how many small packs (< a quarter of the limit) a store
	// may gather before GC merges them: a store of many generations keeps
	// a few files, not one per generation.
	mergeSmall = 8
)

// GC removes what no committed generation needs and repacks packs that are
// mostly unused (see GCOptions); GCWith with the zero options.
func (s *Store) GC() (GCResult, error) { return s.GCWith(GCOptions{}) }

// GCWith removes chunks that no committed generation references, packs
// that hold none in use, temporary files that a killed writer left, and
// repacks as o says. The caller must hold the exclusive lock, so no writer
// is adding chunks meanwhile. A generation whose manifest cannot be read
// keeps every chunk: GC never deletes what it cannot prove unused.
//
// Order, for crashes: new packs are durable (fsynced, renamed, packs/
// fsynced) before any pack or chunk file they replace is removed, so a
// crash at any point leaves every chunk in use in at least one place;
// copies left twice are removed by the next GC.
func (s *Store) GCWith(o GCOptions) (GCResult, error) {
	var res GCResult
	gens, err := s.Generations()
	if err != nil {
		return res, err
	}
	live := map[[32]byte]int{} // chunk name -> format of a manifest using it
	for _, g := range gens {
		m, err := s.ReadManifest(g)
		if err != nil {
			return res, fmt.Errorf("gc: refusing to collect while generation %d is unreadable: %w", g, err)
		}
		for _, f := range m.Files {
			for _, c := range f.Chunks {
				if hb, ok := hashBytes(c.Hash); ok && !c.Zero {
					live[hb] = m.Format
				}
			}
		}
	}
	ix, err := s.index()
	if err != nil {
		return res, err
	}
	// A delta keeps its base.
	for h := range live {
		for _, l := range ix.lookup(h) {
			if l.kind == kindDelta && !l.zeroBase {
				if _, ok := live[l.base]; !ok {
					live[l.base] = 3
				}
			}
		}
	}
	res.Kept = len(live)
	var errs []error
	// Packs a killed writer left unfinished (the lock keeps writers out).
	if ents, err := s.r.readDir("packs"); err == nil {
		for _, e := range ents {
			if isPackTemp(e.Name()) {
				errs = append(errs, s.r.remove("packs/"+e.Name()))
			}
		}
	}

	// Which copy of each live blob stays: the first that checks, in packs
	// by name.
	packs := ix.list()
	slices.SortFunc(packs, func(a, b *packFile) int { return strings.Compare(a.name, b.name) })
	keep := map[[32]byte]blobLoc{} // chunk -> its copy
	type use struct{ live, total int64 }
	usage := map[*packFile]*use{}
	for _, p := range packs {
		usage[p] = &use{total: p.size}
	}
	for _, p := range packs {
		for _, l := range p.entries {
			if _, ok := live[l.hash]; !ok {
				continue
			}
			if prev, dup := keep[l.hash]; dup {
				if s.blobChecks(prev) || !s.blobChecks(l) {
					continue
				}
				usage[prev.p].live -= recHeader + int64(prev.z)
			}
			keep[l.hash] = l
			usage[p].live += recHeader + int64(l.z)
		}
	}
	// Chunks in use that no pack holds: chunk files of a format-1 store.
	var legacy [][32]byte
	for h, format := range live {
		if _, ok := keep[h]; !ok && format < 3 {
			legacy = append(legacy, h)
		}
	}

	// What to rewrite and what to drop.
	limit := s.PackLimit
	if limit <= 0 {
		limit = DefaultPackLimit
	}
	var small []*packFile
	for _, p := range packs {
		if p.size < limit/4 && usage[p].live > 0 {
			small = append(small, p)
		}
	}
	rewrite := map[*packFile]bool{}
	for _, p := range packs {
		u := usage[p]
		switch {
		case u.live == 0:
		case o.Repack && u.live < u.total-indexBytes(p):
			rewrite[p] = true
		case float64(u.live) < RepackBelow*float64(u.total):
			rewrite[p] = true
		}
	}
	if o.Repack && len(small) > 1 || len(small) > mergeSmall {
		for _, p := range small {
			rewrite[p] = true
		}
	}
	pw := s.newPackWriter()
	copied := 0
	failed := map[*packFile]bool{} // packs not to remove: a live blob in them did not copy
	copyBlob := func(l blobLoc) {
		if err := s.exportBlob(l, func(r record, z []byte) error {
			_, err := pw.append(r, z)
			return err
		}); err != nil {
			failed[l.p] = true
			res.Damaged++
			return
		}
		copied++
	}
	for _, l := range keep {
		if rewrite[l.p] {
			copyBlob(l)
		}
	}
	if o.Repack && len(legacy) > 0 {
		// Packing a format-1 store's chunk files converts it: it says
		// format 2 (and gets a key) before its first pack, so that an
		// older cryo refuses it instead of finding its chunks missing.
		if _, err := s.keyed(); err != nil {
			return res, fmt.Errorf("gc: %w", err)
		}
		for _, h := range legacy {
			c := Chunk{Hash: fmt.Sprintf("%x", h[:])}
			err := s.readChunkFile(legacyRel(c.Hash), func(z []byte) error {
				data, err := decodeFrame(z, nil)
				if err != nil || !s.verifier(1)(data, c.Hash) {
					return errors.New("damaged")
				}
				_, err = pw.append(record{kind: kindFull, hash: h, n: uint32(len(data))}, z)
				return err
			})
			if err != nil {
				res.Damaged++
				continue
			}
			res.ChunkFiles++
		}
	}
	if err := pw.finish(); err != nil {
		return res, fmt.Errorf("gc: write new packs: %w", err)
	}
	res.PacksWritten = len(pw.finished)
	if copied > 0 || res.ChunkFiles > 0 {
		CrashPoint("repack-written")
	}

	// Now every chunk in use is durable in a pack that stays.
	for _, p := range packs {
		u := usage[p]
		if failed[p] || (u.live > 0 && !rewrite[p]) {
			continue
		}
		for _, l := range p.entries {
			if _, ok := live[l.hash]; !ok {
				res.Chunks++
			}
		}
		if err := s.r.remove(p.rel()); err != nil {
			errs = append(errs, err)
			continue
		}
		res.PacksRemoved++
		res.Bytes += p.size
		if u.live > 0 {
			res.Repacked++
			res.Bytes -= u.live
		}
		CrashPoint("gc")
	}
	if res.PacksRemoved > 0 || res.PacksWritten > 0 {
		if err := s.r.syncDir("packs"); err != nil {
			errs = append(errs, err)
		}
		if _, err := s.index(); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, s.gcChunkFiles(live, o.Repack && res.ChunkFiles > 0, &res))
	return res, errors.Join(errs...)
}

// indexBytes is a pack's index and footer.
func indexBytes(p *packFile) int64 { return int64(len(p.entries))*indexEntry + footerLen }

// blobChecks reports whether the blob at l matches its record's check.
func (s *Store) blobChecks(l blobLoc) bool {
	return s.readBlob(l, func(z []byte) error {
		if fileCheckBits(z) != l.check {
			return errors.New("damaged")
		}
		return nil
	}) == nil
}

// gcChunkFiles removes chunk files of a format-1 store that no generation
// uses (and, once packed, all of them but those whose copy did not pack),
// and temporary files a killed writer left in chunks/.
func (s *Store) gcChunkFiles(live map[[32]byte]int, packed bool, res *GCResult) error {
	subs, err := s.r.readDir("chunks")
	if err != nil {
		return nil // a store without chunk files
	}
	ix, err := s.currentIndex()
	if err != nil {
		return err
	}
	var errs []error
	for _, sub := range subs {
		dir := "chunks/" + sub.Name()
		if !sub.IsDir() {
			continue
		}
		ents, err := s.r.readDir(dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			name := e.Name()
			h, ok := hashBytes(name)
			_, inUse := live[h]
			if ok && inUse && !strings.Contains(name, ".tmp") {
				if !packed || len(ix.lookup(h)) == 0 {
					continue
				}
			} else if info, err := e.Info(); err == nil {
				res.Bytes += info.Size()
				res.Chunks++
			}
			if err := s.r.remove(dir + "/" + name); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
				continue
			}
			CrashPoint("gc")
		}
		if packed {
			_ = s.r.remove(dir) // empty now, or kept by what stays in it
		}
	}
	return errors.Join(errs...)
}

// Retain removes the oldest generations so that at most keep remain
// (keep <= 0 keeps all), then collects their chunks. The caller must hold
// the exclusive lock.
func (s *Store) Retain(keep int) ([]int, error) {
	if keep <= 0 {
		return nil, nil
	}
	gens, err := s.Generations()
	if err != nil {
		return nil, err
	}
	var removed []int
	for len(gens) > keep {
		if err := s.Remove(gens[0]); err != nil {
			return removed, err
		}
		removed = append(removed, gens[0])
		gens = gens[1:]
	}
	if len(removed) > 0 {
		if _, err := s.GC(); err != nil {
			return removed, err
		}
	}
	return removed, nil
}
