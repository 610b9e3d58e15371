package store

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"sync"
)

// Source serves the files of one generation as streams, for a restore that
// reads its images from a pipe (criu.ImageSource) instead of from files:
// chunks are read, decompressed and verified in parallel a few ahead of the
// reader and written in order, so that the pages never pass through a file.
// A damaged chunk is healed from the replica when there is one; otherwise
// Send fails with a *CorruptError before the reader has the whole file.
type Source struct {
	s     *Store
	m     *Manifest
	files map[string]int // name -> index in m.Files
	heal  *healer        // nil without a replica
	bufs  chan []byte    // decode buffers for reuse
}

// NewSource serves generation m of s. replica may be nil.
func (s *Store) NewSource(m *Manifest, replica *Store) *Source {
	src := &Source{s: s, m: m, files: map[string]int{}, bufs: make(chan []byte, 64)}
	for i, f := range m.Files {
		if f.Kind != "log" {
			src.files[f.Name] = i
		}
	}
	if replica != nil {
		src.heal = newHealer(s, replica, m.Format)
	}
	_, _ = s.index() // packs written since the store was opened; a failure shows per chunk
	for _, f := range m.Files {
		if f.Kind != "log" {
			s.Progress.AddTotal(f.Size)
		}
	}
	return src
}

// Has tells whether the generation holds a file of that name.
func (src *Source) Has(name string) bool {
	_, ok := src.files[name]
	return ok
}

// Healed lists the chunks healed from the replica so far; Finish reports
// whether writing them back into the store worked.
func (src *Source) Healed() []Problem {
	if src.heal == nil {
		return nil
	}
	return src.heal.list()
}

// Finish completes the healing (see MaterializeFrom).
func (src *Source) Finish() error {
	if src.heal == nil {
		return nil
	}
	return src.heal.finish()
}

type streamResult struct {
	data []byte
	err  error
}

// Send writes the whole file to w.
func (src *Source) Send(ctx context.Context, name string, w io.Writer) error {
	return src.SendSkipping(ctx, name, w, nil)
}

// SendSkipping is Send leaving out the zero chunks whose indexes are in
// skip (a restore that knows the memory they hold starts out zero).
func (src *Source) SendSkipping(ctx context.Context, name string, w io.Writer, skip map[int]bool) error {
	fi, ok := src.files[name]
	if !ok {
		return fmt.Errorf("generation %d has no file %s", src.m.Generation, name)
	}
	f := &src.m.Files[fi] // its chunks add up to its size: ReadManifest checks
	for i := range skip {
		if i < 0 || i >= len(f.Chunks) || !f.Chunks[i].Zero {
			return fmt.Errorf("%s: chunk %d is not a zero chunk and cannot be left out", name, i)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Workers decode the stored chunks; at most ahead of them wait for the
	// writer, which bounds the memory to ahead+workers chunks.
	workers := runtime.GOMAXPROCS(0)
	ahead := 4 * workers
	results := make([]chan streamResult, len(f.Chunks))
	offs := make([]int64, len(f.Chunks))
	var off int64
	for i, c := range f.Chunks {
		offs[i] = off
		off += c.Len
		if !c.Zero {
			results[i] = make(chan streamResult, 1)
		}
	}
	slots := make(chan struct{}, ahead)
	jobs := make(chan int)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: workers see it and stop
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(jobs)
		for i, c := range f.Chunks {
			if c.Zero {
				continue
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			select {
			case jobs <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				c := f.Chunks[i]
				var buf []byte
				select {
				case buf = <-src.bufs:
				default:
				}
				data, err := src.s.readChunk(c, buf, false, src.m.Format)
				if err != nil && src.heal != nil {
					data, err = src.heal.heal(job{file: fi, idx: i, off: offs[i], c: c}, f.Name, data, err)
				}
				results[i] <- streamResult{data, err}
			}
		}()
	}
	recycle := func(b []byte) {
		select {
		case src.bufs <- b[:0]:
		default:
		}
	}
	// write sends data; an owned buffer is recycled once it is no longer
	// needed, at once after a copy, later after a vmsplice (splice.go).
	write := func(data []byte, owned bool) error {
		_, err := w.Write(data)
		if owned {
			recycle(data)
		}
		return err
	}
	if f.Kind == "pages" {
		if sp := newSplicer(w, recycle); sp != nil {
			defer sp.finish(ctx)
			write = sp.write
		}
	}
	for i, c := range f.Chunks {
		if c.Zero && skip[i] {
			src.s.Progress.Add(c.Len)
			continue
		}
		if c.Zero {
			if err := write(zeros[:c.Len], false); err != nil {
				return fmt.Errorf("send %s: %w", name, err)
			}
			src.s.Progress.Add(c.Len)
			continue
		}
		var r streamResult
		select {
		case r = <-results[i]:
		case <-ctx.Done():
			return ctx.Err()
		}
		<-slots
		if r.err != nil {
			return &CorruptError{Generation: src.m.Generation, Problems: []Problem{{File: f.Name, Chunk: i,
				Offset: offs[i], Hash: c.Hash, Path: src.s.ChunkLocation(c.Hash), Reason: r.err.Error()}}}
		}
		if err := write(r.data, true); err != nil {
			return fmt.Errorf("send %s: %w", name, err)
		}
		src.s.Progress.Add(c.Len)
	}
	return nil
}
