package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
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
	return fmt.Sprintf("%s: chunk %d at offset %d (%s): %s", p.File, p.Chunk, p.Offset, p.Path, p.Reason)
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
				data, err := s.readChunk(j.c, out, deep)
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
						Hash: j.c.Hash, Path: s.ChunkPath(j.c.Hash), Reason: reason})
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

// readChunk reads, decompresses and checks one chunk (deep: see
// decodeChunk).
func (s *Store) readChunk(c Chunk, buf []byte, deep bool) ([]byte, error) {
	out := buf
	var derr error
	err := s.direct.readChunkFile(s.ChunkPath(c.Hash), func(z []byte) error {
		out, derr = decodeChunk(z, c, buf, deep)
		return nil
	})
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return buf, errors.New("missing")
		}
		return buf, err
	}
	return out, derr
}

// Verify re-hashes the content of every chunk of the generation and returns
// what is wrong (nil when it is intact).
func (s *Store) Verify(ctx context.Context, m *Manifest) []Problem {
	return s.walk(ctx, m, nil, true, func(job, []byte) error { return nil })
}

// Quick checks without reading chunk contents that every chunk exists with
// the size the manifest recorded. It is what `cryo list` calls intact.
// The stats run in parallel: after a restart, or on a parallel file
// system, each one waits for the disk or the server.
func (s *Store) Quick(m *Manifest) []Problem {
	var jobs []Problem // every stored chunk, as the problem it would be
	var sizes []int64
	for _, f := range m.Files {
		var off int64
		for k, c := range f.Chunks {
			if !c.Zero {
				jobs = append(jobs, Problem{File: f.Name, Chunk: k, Offset: off, Hash: c.Hash, Path: s.ChunkPath(c.Hash)})
				sizes = append(sizes, c.Stored)
			}
			off += c.Len
		}
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(16, len(jobs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(jobs); i = int(next.Add(1) - 1) {
				st, err := os.Stat(jobs[i].Path)
				switch {
				case err != nil:
					jobs[i].Reason = "missing"
				case st.Size() != sizes[i]:
					jobs[i].Reason = fmt.Sprintf("is %d bytes, manifest says %d (truncated?)", st.Size(), sizes[i])
				}
			}
		}()
	}
	wg.Wait()
	var ps []Problem
	for _, p := range jobs {
		if p.Reason != "" {
			ps = append(ps, p)
		}
	}
	return ps
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
	for i, f := range m.Files {
		if !sel(f) {
			continue
		}
		p := filepath.Join(dir, filepath.Clean("/" + f.Name)[1:])
		if err := os.MkdirAll(filepath.Dir(p), dirMode); err != nil {
			return err
		}
		fh, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, os.FileMode(f.Mode)&0o700|fileMode)
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
