package migrate

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/cryo-hpc/cryo/internal/memread"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
)

// A base is a generation of the job that both ends hold (the standby's
// copy, a checkpoint an earlier migration left): the source offers its
// store's newest; a destination that holds the very same generation (same
// manifest checksum) loads its pages into its memory files before round 1,
// and the source counts them as sent, so round 1 sends only what changed
// since that checkpoint.

// Base names a generation offered as common ground.
type Base struct {
	Generation int    `json:"generation"`
	Checksum   string `json:"checksum"`
}

// NewestBase is the newest generation of the store at dir, or nil.
func NewestBase(dir string) *Base {
	st, err := store.Open(dir)
	if err != nil {
		return nil
	}
	gens, err := st.Generations()
	if err != nil || len(gens) == 0 {
		return nil
	}
	m, err := st.ReadManifest(gens[len(gens)-1])
	if err != nil || len(m.Job.Trees) > 0 {
		return nil
	}
	return &Base{Generation: m.Generation, Checksum: m.Checksum}
}

// openBase returns the store's copy of b, if it holds exactly that.
func openBase(dir string, b *Base) (*store.Store, *store.Manifest, bool) {
	if b == nil {
		return nil, nil, false
	}
	st, err := store.Open(dir)
	if err != nil {
		return nil, nil, false
	}
	m, err := st.ReadManifest(b.Generation)
	if err != nil || m.Checksum != b.Checksum {
		return nil, nil, false
	}
	return st, m, true
}

// forEachPage calls fn with every page of the processes' memory that
// generation m holds: its pagemap's name, address and content (valid
// during the call). Shared memory is left out (the rounds do not read it).
func forEachPage(ctx context.Context, st *store.Store, m *store.Manifest, fn func(name string, addr uint64, page []byte) error) error {
	buf := make([]byte, maxRunPages*PageSize)
	for _, f := range m.Files {
		if !procPagemap.MatchString(f.Name) {
			continue
		}
		if f.Size > maxPagemap {
			return fmt.Errorf("%s: %d bytes", f.Name, f.Size)
		}
		b, err := st.ReadAt(m, f.Name, 0, f.Size)
		if err != nil {
			return err
		}
		id, entries, err := pageserver.ParsePagemap(b)
		if err != nil {
			return fmt.Errorf("%s: %w", f.Name, err)
		}
		r, err := st.OpenFile(m, "pages-"+strconv.FormatUint(uint64(id), 10)+".img")
		if err != nil {
			return err
		}
		for _, e := range entries {
			if e.Flags&pageserver.PEPresent == 0 {
				continue
			}
			addr, left := e.Vaddr, int64(e.NrPages)*PageSize
			for left > 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
				p := buf[:min(left, int64(len(buf)))]
				if _, err := io.ReadFull(r, p); err != nil {
					return fmt.Errorf("%s: %w", f.Name, err)
				}
				for i := 0; i < len(p); i += PageSize {
					if err := fn(f.Name, addr, p[i:i+PageSize]); err != nil {
						return err
					}
					addr += PageSize
				}
				left -= int64(len(p))
			}
		}
	}
	return nil
}

// seed counts the base's pages as sent: the tracker holds their digests.
func seed(ctx context.Context, dir string, b *Base, tr *memread.Tracker) (int64, error) {
	st, m, ok := openBase(dir, b)
	if !ok {
		return 0, fmt.Errorf("generation %d is no longer in %s", b.Generation, dir)
	}
	var n int64
	err := forEachPage(ctx, st, m, func(name string, addr uint64, page []byte) error {
		sm := procPagemap.FindStringSubmatch(name)
		id, _ := strconv.Atoi(sm[1])
		tr.Note(id, addr, memread.PageDigest(page))
		n++
		return nil
	})
	return n, err
}

// preload writes the base's pages into the receiver's memory files.
func (r *receiver) preload(ctx context.Context, st *store.Store, m *store.Manifest) (int64, error) {
	var n int64
	err := forEachPage(ctx, st, m, func(name string, addr uint64, page []byte) error {
		if isZeroPage(page) {
			return nil // a hole reads as zeros
		}
		f, err := r.memFile(name)
		if err != nil {
			return err
		}
		if _, err := f.WriteAt(page, int64(addr)); err != nil {
			return err
		}
		n++
		return nil
	})
	return n, err
}

func isZeroPage(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
