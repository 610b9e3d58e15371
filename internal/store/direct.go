package store

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Packs are written and read with O_DIRECT where the file system takes it:
// the compressed bytes go from cryo's buffers to the disk and back without
// a page-cache copy. On these machines (and on any VM that hands freed
// memory back to its host) filling fresh page-cache pages was the largest
// single cost of a checkpoint; it also leaves little for the final fsync
// to flush. The last partial block of each pack goes through the page
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

// directState remembers that a file system refused O_DIRECT: the store
// then reads and writes through the page cache.
type directState struct{ refused atomic.Bool }

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

// zbufs holds aligned buffers for reading blobs with O_DIRECT.
var zbufs = sync.Pool{New: func() any {
	b := alignedBuf(maxStored + 2*directAlign)
	return &b
}}

// maxStored bounds a blob: a 1 MiB chunk stored raw is a few bytes longer
// than 1 MiB; anything much bigger is not a chunk.
const maxStored = 2 * MaxChunk

// readChunkFile calls fn with the content of a format-1 chunk file (rel,
// beneath the store), read with O_DIRECT where the file system takes it,
// so that reading a generation does not fill the page cache (fresh memory)
// with compressed bytes that are needed once. fn must not keep the slice.
func (s *Store) readChunkFile(rel string, fn func([]byte) error) error {
	flags := unix.O_RDONLY
	if !s.direct.refused.Load() {
		flags |= unix.O_DIRECT
	}
	f, err := s.r.open(rel, flags, 0)
	if err != nil && flags&unix.O_DIRECT != 0 && errors.Is(err, unix.EINVAL) {
		s.direct.refused.Store(true)
		flags &^= unix.O_DIRECT
		f, err = s.r.open(rel, flags, 0)
	}
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
