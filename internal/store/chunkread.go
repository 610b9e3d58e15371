package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
)

// ReadChunk reads, decompresses and verifies one chunk (zero chunks come
// back as zeros without touching the disk).
func (s *Store) ReadChunk(c Chunk) ([]byte, error) {
	if c.Zero {
		return make([]byte, c.Len), nil
	}
	return s.readChunk(c, nil, false)
}

// decodeChunk decompresses a chunk file's bytes into buf and checks them.
// A deep check hashes the content against the chunk's name. Otherwise,
// where the manifest recorded the file's Check and the bytes match it, the
// file is as it was written, and the content it decompresses to was named
// when it was written; that costs a CRC of the stored bytes, 20 times
// cheaper than SHA-256 here. Bytes that do not match get the deep check:
// a chunk rewritten by another cryo (another encoder) is still good if its
// content is.
func decodeChunk(z []byte, c Chunk, buf []byte, deep bool) ([]byte, error) {
	asWritten := !deep && c.Check != "" && fileCheck(z) == c.Check
	data, err := decodeFrame(z, buf)
	if err != nil {
		return buf, fmt.Errorf("cannot decompress (truncated or damaged): %v", err)
	}
	if int64(len(data)) != c.Len {
		return data, fmt.Errorf("holds %d bytes, manifest says %d", len(data), c.Len)
	}
	if !asWritten {
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != c.Hash {
			return data, errors.New("content does not match its SHA-256")
		}
	}
	return data, nil
}
