package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// Problem is one bad chunk or file found by Verify or Materialize.
type Problem struct {
	File   string `json:"file"`
	Chunk  int    `json:"chunk"`  // index in the file, -1 for the file itself
	Offset int64  `json:"offset"` // offset of the chunk in the file
	Hash   string `json:"hash"`
	Path   string `json:"path"` // the chunk file in the store
	Reason string `json:"reason"`
}

func (p Problem) String() string {
	if p.Chunk < 0 {
		return fmt.Sprintf("%s: %s", p.File, p.Reason)
	}
	return fmt.Sprintf("%s: chunk %d at offset %d (%s, %s): %s", p.File, p.Chunk, p.Offset, p.Hash, p.Path, p.Reason)
}

// CorruptError lists what is wrong with a generation.
type CorruptError struct {
	Generation int
	Problems   []Problem
}

func (e *CorruptError) Error() string {
	s := fmt.Sprintf("generation %d is corrupt: %s", e.Generation, e.Problems[0])
	if n := len(e.Problems) - 1; n > 0 {
		s += fmt.Sprintf(" (and %d more problems; run cryo verify)", n)
	}
	return s
}

func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

// decoder decodes chunks, none of which holds more than MaxChunk bytes: a
// damaged frame header that claims more is refused, not allocated for.
var decoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderLowmem(false),
	zstd.WithDecoderMaxMemory(MaxChunk))

type job struct {
	file, idx int
	off       int64
	c         Chunk
}

// walk runs fn on every chunk of the selected files in parallel, with the
// chunk's verified content. It collects every problem rather than stopping
// at the first, so that a user learns the whole damage at once.
func (s *Store) walk(ctx context.Context, m *Manifest, sel func(File) bool, deep bool, fn func(j job, data []byte) error) []Problem {
	return s.walkHealing(ctx, m, sel, deep, nil, fn)
}

// healFunc is given a chunk that failed to read (err says why) and returns
// its verified content from elsewhere, or an error saying why it cannot.
type healFunc func(j job, name string, buf []byte, err error) ([]byte, error)

// walkHealing is walk with a heal function for bad chunks (nil: none).
// deep is decodeChunk's: whether every chunk's content is hashed.
func (s *Store) walkHealing(ctx context.Context, m *Manifest, sel func(File) bool, deep bool, heal healFunc, fn func(j job, data []byte) error) []Problem {
	if _, err := s.index(); err != nil {
		return []Problem{{Chunk: -1, Path: s.r.pathOf("packs"), Reason: err.Error()}}
	}
	var jobs []job
	for i, f := range m.Files {
		if sel != nil && !sel(f) {
			continue
		}
		var off int64
		for k, c := range f.Chunks {
			jobs = append(jobs, job{file: i, idx: k, off: off, c: c})
			off += c.Len
		}
		if off != f.Size {
			return []Problem{{File: f.Name, Chunk: -1, Reason: fmt.Sprintf("chunks add up to %d bytes, file is %d", off, f.Size)}}
		}
		s.Progress.AddTotal(f.Size)
	}
	var (
		mu       sync.Mutex
		problems []Problem
		wg       sync.WaitGroup
	)
	work := make(chan job)
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out []byte
			for j := range work {
				var reason string
				s.Progress.Add(j.c.Len)
				if j.c.Zero {
					continue // nothing stored; the file already reads as zeros there
				}
				data, err := s.readChunk(j.c, out, deep, m.Format)
				if err != nil && heal != nil {
					data, err = heal(j, m.Files[j.file].Name, data, err)
				}
				out = data[:0]
				if err != nil {
					reason = err.Error()
				} else if err := fn(j, data); err != nil {
					reason = err.Error()
				}
				if reason != "" {
					mu.Lock()
					problems = append(problems, Problem{File: m.Files[j.file].Name, Chunk: j.idx, Offset: j.off,
						Hash: j.c.Hash, Path: s.ChunkLocation(j.c.Hash), Reason: reason})
					mu.Unlock()
				}
			}
		}()
	}
	for _, j := range jobs {
		if ctx.Err() != nil {
			break
		}
		work <- j
	}
	close(work)
	wg.Wait()
	if ctx.Err() != nil {
		problems = append(problems, Problem{Chunk: -1, Reason: ctx.Err().Error()})
	}
	return problems
}

// Verify re-hashes the content of every chunk of the generation and returns
// what is wrong (nil when it is intact).
func (s *Store) Verify(ctx context.Context, m *Manifest) []Problem {
	return s.walk(ctx, m, nil, true, func(job, []byte) error { return nil })
}

// Quick checks without reading chunk contents that every chunk is in
// the store with the stored size the manifest recorded (and a delta's
// base too). It is what `cryo list` calls intact. It reads the index of
// every pack once; chunks of a format-1 store are stat'ed, in parallel:
// after a restart, or on a parallel file system, each one waits for the
// disk or the server.
func (s *Store) Quick(m *Manifest) []Problem {
	ix, err := s.index()
	if err != nil {
		return []Problem{{Chunk: -1, Path: s.r.pathOf("packs"), Reason: err.Error()}}
	}
	var ps []Problem
	var legacy []Problem // chunks not in a pack, as the problem they would be
	var sizes []int64
	for _, f := range m.Files {
		var off int64
		for k, c := range f.Chunks {
			if c.Zero {
				off += c.Len
				continue
			}
			p := Problem{File: f.Name, Chunk: k, Offset: off, Hash: c.Hash}
			off += c.Len
			hb, _ := hashBytes(c.Hash)
			locs := ix.lookup(hb)
			if len(locs) == 0 {
				if m.Format < 3 {
					p.Path = s.ChunkPath(c.Hash)
					legacy = append(legacy, p)
					sizes = append(sizes, c.Stored)
					continue
				}
				p.Path, p.Reason = s.r.pathOf("packs"), "missing"
				ps = append(ps, p)
				continue
			}
			p.Path = locs[0].where()
			if reason := quickLoc(ix, locs, c); reason != "" {
				p.Reason = reason
				ps = append(ps, p)
			}
		}
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(16, len(legacy)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(legacy); i = int(next.Add(1) - 1) {
				st, err := s.r.stat(legacyRel(legacy[i].Hash))
				switch {
				case err != nil:
					legacy[i].Reason = "missing"
				case st.Size != sizes[i]:
					legacy[i].Reason = fmt.Sprintf("is %d bytes, manifest says %d (truncated?)", st.Size, sizes[i])
				}
			}
		}()
	}
	wg.Wait()
	for _, p := range legacy {
		if p.Reason != "" {
			ps = append(ps, p)
		}
	}
	return ps
}

// quickLoc says what is wrong with the copies of chunk c ("" if one of
// them looks whole).
func quickLoc(ix *packIndex, locs []blobLoc, c Chunk) string {
	reason := ""
	for _, l := range locs {
		switch {
		case c.Stored != 0 && int64(l.z) != c.Stored:
			reason = fmt.Sprintf("is %d bytes in its pack, manifest says %d", l.z, c.Stored)
		case int64(l.n) != c.Len:
			reason = fmt.Sprintf("holds %d bytes, manifest says %d", l.n, c.Len)
		case l.kind == kindDelta && !l.zeroBase && !hasFull(ix, l.base, l.n):
			reason = fmt.Sprintf("its base %x is missing", l.base[:8])
		default:
			return ""
		}
	}
	return reason
}

func hasFull(ix *packIndex, h [32]byte, n uint32) bool {
	for _, l := range ix.lookup(h) {
		if l.kind == kindFull && l.n == n {
			return true
		}
	}
	return false
}

// where names a blob's place for messages: its pack and offset.
func (l blobLoc) where() string {
	if l.p == nil {
		return "a pack being written"
	}
	return fmt.Sprintf("%s at %d", l.p.rel(), l.off)
}

// ChunkLocation says where the store keeps the chunk named hash: its pack
// file and offset, or its chunk file in a format-1 store (for messages).
func (s *Store) ChunkLocation(hash string) string {
	if hb, ok := hashBytes(hash); ok {
		if ix, err := s.currentIndex(); err == nil {
			if locs := ix.lookup(hb); len(locs) > 0 {
				return s.r.pathOf(locs[0].where())
			}
		}
	}
	if s.Format() < 2 || s.r.exists(legacyRel(hash)) {
		return s.ChunkPath(hash)
	}
	return s.r.pathOf("packs")
}

// Materialize writes the generation's files into dir (which must exist),
// verifying every chunk on the way. It returns a *CorruptError (ErrCorrupt)
// naming each bad file and chunk; files are written only in dir.
// kinds selects which kinds of file to write (nil: all but logs).
func (s *Store) Materialize(ctx context.Context, m *Manifest, dir string, kinds ...string) error {
	return s.materialize(ctx, m, dir, nil, kinds)
}

func (s *Store) materialize(ctx context.Context, m *Manifest, dir string, heal healFunc, kinds []string) error {
	sel := func(f File) bool {
		if len(kinds) == 0 {
			return f.Kind != "log"
		}
		for _, k := range kinds {
			if f.Kind == k {
				return true
			}
		}
		return false
	}
	out := make([]*os.File, len(m.Files))
	defer func() {
		for _, f := range out {
			if f != nil {
				f.Close()
			}
		}
	}()
	df, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer df.Close()
	dr := root{fd: int(df.Fd()), path: dir}
	for i, f := range m.Files {
		if !sel(f) {
			continue
		}
		// The names were checked when the manifest was read: relative,
		// clean, without "..". Nothing is created through a link.
		if d := filepath.Dir(f.Name); d != "." {
			if err := dr.mkdirAll(d); err != nil {
				return err
			}
		}
		fh, err := dr.open(f.Name, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, os.FileMode(f.Mode)&0o700|fileMode)
		if err != nil {
			return err
		}
		out[i] = fh
		if err := fh.Truncate(f.Size); err != nil {
			return err
		}
	}
	problems := s.walkHealing(ctx, m, sel, false, heal, func(j job, data []byte) error {
		_, err := out[j.file].WriteAt(data, j.off)
		return err
	})
	if len(problems) > 0 {
		return &CorruptError{Generation: m.Generation, Problems: problems}
	}
	return nil
}
