package store

import (
	"fmt"
	"io"
)

// ReadAt returns n bytes at offset off of the generation's file name,
// reading and verifying only the chunks that hold them, so that a caller
// can look at a few bytes of a large image (a process's command line in
// its pages) without materializing it. It returns fewer bytes only at the
// end of the file.
func (s *Store) ReadAt(m *Manifest, name string, off, n int64) ([]byte, error) {
	var f *File
	for i := range m.Files {
		if m.Files[i].Name == name {
			f = &m.Files[i]
			break
		}
	}
	if f == nil {
		return nil, fmt.Errorf("generation %d has no file %s", m.Generation, name)
	}
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("%s: bad range %d+%d", name, off, n)
	}
	if n > MaxImage {
		return nil, fmt.Errorf("%s: %d bytes at once, more than the %d a reader takes into memory", name, n, MaxImage)
	}
	end := min(off+n, f.Size)
	out := make([]byte, 0, max(end-off, 0))
	var pos int64
	for i, c := range f.Chunks {
		cend := pos + c.Len
		if cend > off && pos < end {
			var data []byte
			if c.Zero {
				data = zeros[:c.Len]
			} else {
				var err error
				if data, err = s.readChunk(c, nil, false, m.Format); err != nil {
					return nil, &CorruptError{Generation: m.Generation, Problems: []Problem{{File: name, Chunk: i,
						Offset: pos, Hash: c.Hash, Path: s.ChunkLocation(c.Hash), Reason: err.Error()}}}
				}
			}
			lo, hi := max(off, pos)-pos, min(end, cend)-pos
			out = append(out, data[lo:hi]...)
		}
		if cend >= end {
			break
		}
		pos = cend
	}
	return out, nil
}

// FileReader reads one file of a generation from its start, a chunk at a
// time, verifying each: a reader of a large image (a pagemap) holds one
// chunk, not the file.
type FileReader struct {
	s    *Store
	m    *Manifest
	f    *File
	next int    // chunk to read next
	off  int64  // offset of that chunk
	buf  []byte // the rest of the current chunk
	own  []byte
}

// OpenFile returns a reader of the generation's file name.
func (s *Store) OpenFile(m *Manifest, name string) (*FileReader, error) {
	for i := range m.Files {
		if m.Files[i].Name == name {
			return &FileReader{s: s, m: m, f: &m.Files[i]}, nil
		}
	}
	return nil, fmt.Errorf("generation %d has no file %s", m.Generation, name)
}

// Size is the file's size.
func (r *FileReader) Size() int64 { return r.f.Size }

// Read implements io.Reader; a damaged chunk is a *CorruptError.
func (r *FileReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.next >= len(r.f.Chunks) {
			return 0, io.EOF
		}
		c := r.f.Chunks[r.next]
		if c.Zero {
			r.buf = zeros[:c.Len]
		} else {
			data, err := r.s.readChunk(c, r.own[:0], false, r.m.Format)
			if err != nil {
				return 0, &CorruptError{Generation: r.m.Generation, Problems: []Problem{{File: r.f.Name, Chunk: r.next,
					Offset: r.off, Hash: c.Hash, Path: r.s.ChunkLocation(c.Hash), Reason: err.Error()}}}
			}
			r.own, r.buf = data, data
		}
		r.next++
		r.off += c.Len
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}
