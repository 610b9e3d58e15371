package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Chunk files are written with O_DIRECT where the file system takes it:
// the compressed bytes go from the worker's buffer to the disk without a
// page-cache copy. On these machines (and on any VM that hands freed
// memory back to its host) filling fresh page-cache pages was the largest
// single cost of a checkpoint; it also leaves little for the final syncfs
// to flush. The last partial block of each file goes through the page
// cache, since O_DIRECT writes whole blocks.

const directAlign = 4096

// alignedBuf returns a buffer of capacity n whose first byte is aligned for
// O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+directAlign)
	off := directAlign - int(uintptr(unsafe.Pointer(&b[0]))%directAlign)
	if off == directAlign {
		off = 0
	}
	return b[off : off : off+n]
}

func aligned(b []byte) bool {
	return cap(b) > 0 && uintptr(unsafe.Pointer(&b[:1][0]))%directAlign == 0
}

// directState remembers that a file system refused O_DIRECT: the store
// then writes through the page cache.
type directState struct{ refused atomic.Bool }

// writeChunk writes z as the chunk file path, whole or not at all: into a
// temporary sibling (directly where it can), then renamed into place.
// Durability comes from the syncfs before a commit, or fsync for heals.
// Every chunk a store, its replica or a heal writes goes through here.
func (s *Store) writeChunk(path string, z []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return err
	}
	tmp, err := s.direct.writeTemp(dir, filepath.Base(path)[:16]+".tmp*", z)
	if err == nil {
		if err = os.Rename(tmp, path); err != nil {
			os.Remove(tmp)
		}
	}
	if err != nil {
		return fmt.Errorf("write chunk %s: %w", path, err)
	}
	return nil
}

// writeTemp creates a temporary file in dir with data in it and returns
// its name.
func (d *directState) writeTemp(dir, prefix string, data []byte) (string, error) {
	if !d.refused.Load() && aligned(data) && len(data) >= directAlign {
		name, err := writeDirect(dir, prefix, data)
		if err == nil {
			return name, nil
		}
		if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP) {
			return "", err
		}
		d.refused.Store(true)
	}
	f, err := os.CreateTemp(dir, prefix)
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

func writeDirect(dir, prefix string, data []byte) (name string, err error) {
	f, err := os.CreateTemp(dir, prefix)
	if err != nil {
		return "", err
	}
	name = f.Name()
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(name)
		}
	}()
	fd := int(f.Fd())
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return name, err
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_DIRECT); err != nil {
		return name, err
	}
	whole := len(data) / directAlign * directAlign
	if err := pwriteAll(fd, data[:whole], 0); err != nil {
		return name, err
	}
	if whole == len(data) {
		return name, nil
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_DIRECT); err != nil {
		return name, err
	}
	return name, pwriteAll(fd, data[whole:], int64(whole))
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// zbufs holds aligned buffers for reading chunk files with O_DIRECT.
var zbufs = sync.Pool{New: func() any {
	b := alignedBuf(MaxChunk + 64<<10)
	return &b
}}

// maxStored bounds a chunk file: a 1 MiB chunk stored raw is a few bytes
// longer than 1 MiB; anything much bigger is not a chunk.
const maxStored = 2 * MaxChunk

// readChunkFile calls fn with the content of a chunk file, read with
// O_DIRECT where the file system takes it, so that reading a generation
// does not fill the page cache (fresh memory) with compressed bytes that
// are needed once. fn must not keep the slice.
func (d *directState) readChunkFile(path string, fn func([]byte) error) error {
	if !d.refused.Load() {
		err := readDirect(path, fn)
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		d.refused.Store(true)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return fn(b)
}

// readDirect is readChunkFile's O_DIRECT read; EINVAL means the file
// system does not take it.
func readDirect(path string, fn func([]byte) error) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() > maxStored {
		return fmt.Errorf("is %d bytes, more than any chunk", st.Size())
	}
	bp := zbufs.Get().(*[]byte)
	defer zbufs.Put(bp)
	need := int(st.Size()+directAlign-1) / directAlign * directAlign
	if cap(*bp) < need {
		*bp = alignedBuf(need)
	}
	b := (*bp)[:need]
	n := 0
	for n < need {
		k, err := f.Read(b[n:])
		n += k
		if err == io.EOF || (err == nil && k == 0) {
			break
		}
		if err != nil {
			return err
		}
	}
	return fn(b[:n])
}
