package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// damage is one random corruption of a committed store.
type damage struct {
	kind string // "flip", "truncate", "delete"
	path string // the chunk file or manifest damaged
	hash string // the chunk's hash; "" for a manifest
	gen  int    // for a manifest: its generation
}

func (d damage) String() string {
	return fmt.Sprintf("%s of %s", d.kind, filepath.Base(d.path))
}

// TestRandomCorruption: 200 random corruptions (bit flips, truncations,
// deletions) of chunks and manifests across three committed generations
// that share chunks. Every one is found: Verify names it, Materialize and
// the restore stream refuse every generation that uses the damaged chunk
// (or manifest), and the newest generation left intact is exactly the one
// a fallback restore goes to. Nothing is repaired between rounds: each
// round undoes its own damage.
func TestRandomCorruption(t *testing.T) {
	s := newStore(t)
	src := t.TempDir()
	// Three generations: the second changes one page image, the third
	// another; the rest is shared.
	base := map[string][]byte{
		"core-1.img":  randBytes(1, 6000),
		"mm-1.img":    randBytes(2, 900),
		"pages-1.img": append(append(memLike(3, 3*MaxChunk), make([]byte, MaxChunk)...), randBytes(4, MaxChunk/3)...),
		"pages-2.img": memLike(5, 2*MaxChunk+5000),
	}
	var ms []*Manifest
	for g := 1; g <= 3; g++ {
		files := map[string][]byte{}
		for k, v := range base {
			files[k] = v
		}
		if g >= 2 {
			files["pages-2.img"] = memLike(50+int64(g), 2*MaxChunk+5000)
		}
		if g == 3 {
			files["core-1.img"] = randBytes(60, 6000)
		}
		specs := writeSpecs(t, filepath.Join(src, fmt.Sprint(g)), files)
		_, m := commit(t, s, specs, nil)
		ms = append(ms, m)
	}
	bases := map[string]string{} // a delta's base
	if ps, err := s.Packs(); err == nil {
		for _, p := range ps {
			for _, r := range p.Records {
				if r.Kind == "delta" {
					bases[r.Hash] = r.Base
				}
			}
		}
	}
	uses := func(m *Manifest, hash string) bool {
		for _, f := range m.Files {
			for _, c := range f.Chunks {
				if !c.Zero && (c.Hash == hash || bases[c.Hash] == hash) {
					return true
				}
			}
		}
		return false
	}
	type target struct {
		path, hash string
		gen        int
		off, end   int64 // the blob in its pack
	}
	var targets []target
	seen := map[string]bool{}
	for _, m := range ms {
		targets = append(targets, target{path: filepath.Join(s.GenDir(m.Generation), "manifest.json"), gen: m.Generation})
		for _, f := range m.Files {
			for _, c := range f.Chunks {
				if !c.Zero && !seen[c.Hash] {
					seen[c.Hash] = true
					p, r := recordOf(t, s, c.Hash)
					targets = append(targets, target{path: p.Path, hash: c.Hash, off: r.Offset + recHeader, end: r.Offset + r.Len})
				}
			}
		}
	}

	rng := rand.New(rand.NewPCG(2026, 11))
	kinds := map[string]int{}
	for round := range 200 {
		tg := targets[rng.IntN(len(targets))]
		d := damage{kind: []string{"flip", "truncate", "delete"}[rng.IntN(3)], path: tg.path, hash: tg.hash, gen: tg.gen}
		kinds[d.kind]++
		orig, err := os.ReadFile(d.path)
		if err != nil {
			t.Fatal(err)
		}
		switch d.kind {
		case "flip":
			// In a pack, within the blob: a header or the index is kept
			// twice, and damage there alone harms no read.
			b := append([]byte(nil), orig...)
			i := rng.IntN(len(b))
			if tg.end > 0 {
				i = int(tg.off) + rng.IntN(int(tg.end-tg.off))
			}
			b[i] ^= 1 << rng.IntN(8)
			writeFile(t, d.path, b)
		case "truncate":
			n := len(orig)
			if tg.end > 0 {
				n = int(tg.end) // cut before the blob's end
			}
			if err := os.Truncate(d.path, int64(rng.IntN(n))); err != nil {
				t.Fatal(err)
			}
		case "delete":
			if err := os.Remove(d.path); err != nil {
				t.Fatal(err)
			}
		}

		// Which generations are hit, and which one a fallback takes.
		newestIntact := 0
		for _, m := range ms {
			hit := (d.hash == "" && m.Generation == d.gen) || (d.hash != "" && uses(m, d.hash))
			err := checkGeneration(s, m, d, t.TempDir())
			switch {
			case hit && err == nil:
				t.Fatalf("round %d: %s: generation %d uses it, and nothing noticed", round, d, m.Generation)
			case hit && err != nil:
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, errVerify) {
					t.Errorf("round %d: %s: generation %d: %v is not a corruption error", round, d, m.Generation, err)
				}
			case !hit && err != nil:
				t.Fatalf("round %d: %s: generation %d does not use it, yet: %v", round, d, m.Generation, err)
			default:
				newestIntact = m.Generation
			}
		}
		if got := newestReadable(s, ms); got != newestIntact {
			t.Fatalf("round %d: %s: a fallback would take generation %d, want %d", round, d, got, newestIntact)
		}
		writeFile(t, d.path, orig) // undo
	}
	for _, k := range []string{"flip", "truncate", "delete"} {
		if kinds[k] < 40 {
			t.Errorf("only %d %s corruptions in 200 rounds", kinds[k], k)
		}
	}
	t.Logf("200 corruptions, all found: %v", kinds)
}

var errVerify = errors.New("verify found problems")

// checkGeneration reads generation m every way a user would: its manifest
// from disk, Verify, Materialize, and the restore stream of every file.
// It returns the first refusal.
func checkGeneration(s *Store, m *Manifest, d damage, scratch string) error {
	disk, err := s.ReadManifest(m.Generation)
	if err != nil {
		return err
	}
	if ps := s.Verify(context.Background(), disk); len(ps) > 0 {
		named := false
		for _, p := range ps {
			named = named || p.Hash == d.hash || strings.Contains(p.Path, d.hash)
		}
		if !named {
			return fmt.Errorf("verify does not name the damaged chunk: %v", ps)
		}
		// Materialize and the stream must refuse too.
		if err := s.Materialize(context.Background(), disk, scratch); !errors.Is(err, ErrCorrupt) {
			return fmt.Errorf("verify found damage that materialize does not call corrupt: %v", err)
		}
		src := s.NewSource(disk, nil)
		streamErr := error(nil)
		for _, f := range disk.Files {
			if f.Kind == "log" {
				continue
			}
			if err := src.Send(context.Background(), f.Name, io.Discard); err != nil {
				streamErr = err
				break
			}
		}
		if !errors.Is(streamErr, ErrCorrupt) {
			return fmt.Errorf("verify found damage that the restore stream does not call corrupt: %v", streamErr)
		}
		return errVerify
	}
	return nil
}

// newestReadable is what a fallback restore looks for: the newest
// generation whose manifest reads and whose chunks all verify.
func newestReadable(s *Store, ms []*Manifest) int {
	for i := len(ms) - 1; i >= 0; i-- {
		m, err := s.ReadManifest(ms[i].Generation)
		if err == nil && len(s.Verify(context.Background(), m)) == 0 {
			return m.Generation
		}
	}
	return 0
}
