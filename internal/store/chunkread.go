package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
)

// ReadChunk reads, decompresses and verifies one chunk of generation m
// (zero chunks come back as zeros without touching the disk).
func (s *Store) ReadChunk(m *Manifest, c Chunk) ([]byte, error) {
	if c.Zero {
		return make([]byte, c.Len), nil
	}
	return s.readChunk(c, nil, false, m.Format)
}

// errMissing is a chunk the store does not have.
var errMissing = errors.New("missing")

// readChunk reads chunk c of a manifest of the given format into buf
// (deep: see decodeChunk). A chunk stored more than once (healed, or
// repacked by a GC that a crash interrupted) is read from the first copy
// that checks out.
func (s *Store) readChunk(c Chunk, buf []byte, deep bool, format int) ([]byte, error) {
	hb, ok := hashBytes(c.Hash)
	if !ok {
		return buf, fmt.Errorf("chunk name %.80q is not a chunk name", c.Hash)
	}
	ix, err := s.currentIndex()
	if err != nil {
		return buf, err
	}
	locs := ix.lookup(hb)
	if len(locs) == 0 {
		if format >= 3 {
			return buf, errMissing
		}
		return s.readLegacy(c, buf, deep)
	}
	var errs []error
	for _, l := range locs {
		out, err := s.decodeLoc(l, c, buf, deep, format)
		if err == nil {
			return out, nil
		}
		buf = out[:0]
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return buf, errs[0]
	}
	return buf, errors.Join(errs...)
}

// readLegacy reads a chunk file of a format-1 store (chunks/<2 hex>/<hash>).
func (s *Store) readLegacy(c Chunk, buf []byte, deep bool) ([]byte, error) {
	out := buf
	var derr error
	err := s.readChunkFile(legacyRel(c.Hash), func(z []byte) error {
		out, derr = decodeChunk(z, c, buf, deep, s.verifier(1))
		return nil
	})
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return buf, errMissing
		}
		return buf, err
	}
	return out, derr
}

// decodeLoc decodes the blob at l as chunk c: a full chunk, or a delta
// applied to its base.
func (s *Store) decodeLoc(l blobLoc, c Chunk, buf []byte, deep bool, format int) ([]byte, error) {
	verify := s.verifier(format)
	if l.kind == kindFull {
		out := buf
		var derr error
		err := s.readBlob(l, func(z []byte) error {
			out, derr = decodeChunk(z, c, buf, deep, verify)
			return nil
		})
		if err != nil {
			return buf, err
		}
		return out, derr
	}
	if l.kind != kindDelta || int64(l.n) != c.Len {
		return buf, fmt.Errorf("%s holds a record of kind %d and %d bytes for it", l.p.rel(), l.kind, l.n)
	}
	// The delta first, into a scratch buffer; then the base into buf.
	pp := shuffleBufs.Get().(*[]byte)
	defer shuffleBufs.Put(pp)
	var payload []byte
	var derr error
	asWritten := false
	err := s.readBlob(l, func(z []byte) error {
		asWritten = !deep && c.Check != "" && fileCheck(z) == c.Check
		if !asWritten && fileCheckBits(z) != l.check {
			derr = errors.New("its delta fails its check")
			return nil
		}
		payload, derr = decodeFrame(z, (*pp)[:0])
		if derr != nil {
			derr = fmt.Errorf("its delta cannot be decompressed (truncated or damaged): %v", derr)
		}
		return nil
	})
	if err == nil {
		err = derr
	}
	if err != nil {
		return buf, err
	}
	out := buf
	if l.zeroBase {
		out = append(buf[:0], zeros[:c.Len]...)
	} else {
		out, err = s.readBase(l.base, int(c.Len), buf)
		if err != nil {
			return out, fmt.Errorf("its base %x: %w", l.base[:8], err)
		}
	}
	*pp = payload[:0]
	if err := applyDelta(out, payload); err != nil {
		return out, err
	}
	if !asWritten && !verify(out, c.Hash) {
		return out, errors.New("content does not match its name")
	}
	return out, nil
}

// readBase reads a delta's base: a full chunk of n bytes named h, checked
// against its record, or by its name where the record does not match.
func (s *Store) readBase(h [32]byte, n int, buf []byte) ([]byte, error) {
	ix, err := s.currentIndex()
	if err != nil {
		return buf, err
	}
	c := Chunk{Hash: hex.EncodeToString(h[:]), Len: int64(n)}
	var errs []error
	for _, l := range ix.lookup(h) {
		if l.kind != kindFull {
			continue
		}
		c.Check = checkString(l.check)
		out, err := s.decodeLoc(l, c, buf, false, 3)
		if err == nil {
			return out, nil
		}
		buf = out[:0]
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return buf, errMissing
	}
	return buf, errors.Join(errs...)
}

// verifier returns the check of a chunk's content against its name, for
// manifests of the given format.
func (s *Store) verifier(format int) func(data []byte, hash string) bool {
	if format < 3 {
		return func(data []byte, hash string) bool {
			sum := sha256.Sum256(data)
			return hex.EncodeToString(sum[:]) == hash
		}
	}
	key := s.pageKey()
	return func(data []byte, hash string) bool {
		return newHasher(key).name(data) == hash
	}
}

// currentIndex is the index as last loaded (loading it if it never was).
func (s *Store) currentIndex() (*packIndex, error) {
	s.idx.mu.Lock()
	loaded := s.idx.blobs != nil
	s.idx.mu.Unlock()
	if loaded {
		return &s.idx, nil
	}
	return s.index()
}

// decodeChunk decompresses a chunk's blob into buf and checks it. A deep
// check hashes the content against the chunk's name. Otherwise, where the
// manifest recorded the blob's Check and the bytes match it, the blob is as
// it was written, and the content it decompresses to was named when it
// was written; that costs a CRC of the stored bytes, 20 times cheaper than
// SHA-256 here. Bytes that do not match get the deep check: a blob
// rewritten by another cryo (another encoder) is still good if its content
// is.
func decodeChunk(z []byte, c Chunk, buf []byte, deep bool, verify func([]byte, string) bool) ([]byte, error) {
	asWritten := !deep && c.Check != "" && fileCheck(z) == c.Check
	data, err := decodeFrame(z, buf)
	if err != nil {
		return buf, fmt.Errorf("cannot decompress (truncated or damaged): %v", err)
	}
	if int64(len(data)) != c.Len {
		return data, fmt.Errorf("holds %d bytes, manifest says %d", len(data), c.Len)
	}
	if !asWritten && !verify(data, c.Hash) {
		return data, errors.New("content does not match its name")
	}
	return data, nil
}
