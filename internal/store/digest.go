package store

// Chunks of manifest format 3 are named by their pages. Each 4 KiB page
// (the last one of a chunk may be shorter) has a digest, the SHA-256 of the
// store's key followed by the page; the chunk's name is the SHA-256 of a
// domain string, its page digests and its length. One pass over the
// content (SHA-256 runs in the CPU's SHA instructions here, about 2 GB/s a
// core, the same as hashing the chunk whole) gives both the name, which
// decides identity and dedup, and the page digests, which say what pages
// a later generation changed (delta.go).
//
// The key (cryo-store.json, readable only by the store's owner) is what
// makes a short page digest safe to store: a full pages chunk keeps the
// first 8 bytes of each page digest in a digest table next to it, and a
// page whose 8 bytes match is taken as unchanged. Without the key, anyone
// who supplies a job's data could search for two pages with the same 64
// bits (2^32 tries) and have cryo restore the old one; with it, nobody who
// cannot read the store can compute a digest at all. The chunk's name uses
// the full 32-byte digests, so it is as collision-resistant as SHA-256.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
)

// PageSize is the granularity of page digests and increments.
const PageSize = 4096

// pagesOf is the number of pages (the last one maybe short) in n bytes.
func pagesOf(n int) int { return (n + PageSize - 1) / PageSize }

// tableDigest is the part of a page digest a digest table keeps.
const tableDigest = 8

// hasher computes page digests and chunk names; one per worker.
type hasher struct {
	key  [32]byte
	h    hash.Hash
	sum  []byte
	digs []byte // pagesOf(MaxChunk) digests of 32 bytes, the last chunk's
}

func newHasher(key [32]byte) *hasher {
	return &hasher{key: key, h: sha256.New(), sum: make([]byte, 0, 32), digs: make([]byte, 0, pagesOf(MaxChunk)*32)}
}

// pageDigest is the digest of one page.
func (x *hasher) pageDigest(p []byte) []byte {
	x.h.Reset()
	x.h.Write(x.key[:])
	x.h.Write(p)
	x.sum = x.h.Sum(x.sum[:0])
	return x.sum
}

// digest fills x.digs with b's page digests and returns b's name.
func (x *hasher) digest(b []byte) string {
	x.digs = x.digs[:0]
	for off := 0; off < len(b); off += PageSize {
		x.digs = append(x.digs, x.pageDigest(b[off:min(off+PageSize, len(b))])...)
	}
	return x.name(len(b))
}

// name is the chunk name of content of n bytes whose page digests are in
// x.digs.
func (x *hasher) name(n int) string {
	x.h.Reset()
	x.h.Write([]byte("cryo chunk v3\x00"))
	x.h.Write(x.digs)
	var l [8]byte
	binary.LittleEndian.PutUint64(l[:], uint64(n))
	x.h.Write(l[:])
	return hex.EncodeToString(x.h.Sum(x.sum[:0]))
}

// table is the digest table of the chunk last digested: tableDigest bytes
// of each page digest.
func (x *hasher) table(dst []byte) []byte {
	dst = dst[:0]
	for i := 0; i+32 <= len(x.digs); i += 32 {
		dst = append(dst, x.digs[i:i+tableDigest]...)
	}
	return dst
}

// zeroTable is the digest table of n zero bytes (a zero chunk as a base).
func (x *hasher) zeroTable(n int) []byte {
	var out []byte
	zp := x.pageDigest(zeros[:PageSize])
	full := append([]byte(nil), zp[:tableDigest]...)
	for off := 0; off < n; off += PageSize {
		if off+PageSize <= n {
			out = append(out, full...)
		} else {
			out = append(out, x.pageDigest(zeros[:n-off])[:tableDigest]...)
		}
	}
	return out
}

// changedPages lists the pages of the chunk last digested whose digests
// differ from those in table (of the same number of pages).
func (x *hasher) changedPages(table []byte) []int {
	var out []int
	for i, j := 0, 0; i+32 <= len(x.digs); i, j = i+32, j+tableDigest {
		if string(x.digs[i:i+tableDigest]) != string(table[j:j+tableDigest]) {
			out = append(out, i/32)
		}
	}
	return out
}
