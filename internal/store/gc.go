package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// GCResult says what GC removed.
type GCResult struct {
	Chunks int   `json:"chunks"`
	Bytes  int64 `json:"bytes"`
	Kept   int   `json:"kept"`
}

// GC removes chunks that no committed generation references, and temporary
// files that a killed writer left in chunks/. The caller must hold the
// exclusive lock, so no writer is adding chunks meanwhile. A generation
// whose manifest cannot be read keeps every chunk: GC never deletes what it
// cannot prove unused.
func (s *Store) GC() (GCResult, error) {
	var res GCResult
	gens, err := s.Generations()
	if err != nil {
		return res, err
	}
	live := map[string]bool{}
	for _, g := range gens {
		m, err := s.ReadManifest(g)
		if err != nil {
			return res, fmt.Errorf("gc: refusing to collect while generation %d is unreadable: %w", g, err)
		}
		for _, f := range m.Files {
			for _, c := range f.Chunks {
				live[c.Hash] = true
			}
		}
	}
	root := filepath.Join(s.Dir, "chunks")
	subs, err := os.ReadDir(root)
	if err != nil {
		return res, err
	}
	var errs []error
	for _, sub := range subs {
		dir := filepath.Join(root, sub.Name())
		ents, err := os.ReadDir(dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			name := e.Name()
			if live[name] && !strings.Contains(name, ".tmp") {
				res.Kept++
				continue
			}
			if info, err := e.Info(); err == nil {
				res.Bytes += info.Size()
			}
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
				continue
			}
			res.Chunks++
			crashPoint("gc")
		}
	}
	return res, errors.Join(errs...)
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
