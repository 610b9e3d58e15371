package store

import (
	"encoding/binary"
	"errors"
	"slices"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Memory that does not compress (random numbers, already compressed data)
// still costs zstd most of its time to find that out. A sample of the chunk
// is compressed first; when it does not shrink, the chunk is stored as a
// zstd frame of raw blocks, which every zstd decoder reads, for the price
// of a copy.

const (
	probeLen    = 16 << 10
	rawBlockMax = 128 << 10 // zstd's largest block
)

// compressChunk appends b, compressed, to dst[:0]: one zstd frame, or a
// filter frame and then one zstd frame (see shuffle8). probe is scratch
// space of at least probeLen+64 bytes, and sbuf (MaxChunk bytes) takes a
// shuffled chunk. The result depends only on b and the encoder's settings,
// so the same content always makes the same bytes.
func compressChunk(enc *zstd.Encoder, b, dst, probe, sbuf []byte) ([]byte, []byte) {
	if len(b) >= 4*probeLen {
		if numeric(b) {
			sb := sbuf[:len(b)]
			shuffle8(sb, b)
			dst = append(dst[:0], filterHeader[:]...)
			return enc.EncodeAll(sb, dst), probe
		}
		// The sample is four pieces spread over the chunk, which may
		// change character within a megabyte.
		const piece = probeLen / 4
		sample := sbuf[:probeLen]
		for i := range 4 {
			at := i * len(b) / 4
			copy(sample[i*piece:(i+1)*piece], b[at:])
		}
		probe = enc.EncodeAll(sample, probe[:0])
		if len(probe) >= probeLen-probeLen/64 {
			return rawFrame(b, dst[:0]), probe
		}
	}
	return enc.EncodeAll(b, dst[:0]), probe
}

// Arrays of numbers, most of a simulation's memory, compress poorly as
// bytes: neighbouring values share their sign, exponent and high mantissa
// bytes, but those sit 8 bytes apart, behind low bytes that differ.
// Gathering byte 0 of every 8-byte word, then byte 1, and so on (the
// shuffle filter of HDF5 and Blosc) puts them side by side. On the bench's
// float64 fields this shrinks zstd's output eightfold and makes it four
// times as fast, shuffle included. A chunk is shuffled when it looks like
// such an array (numeric). Compressing a sample both ways does not decide
// it as well: a field's values vary slowly over a few kilobytes, where both
// ways compress to almost nothing, and fast over a megabyte.
//
// A shuffled chunk is stored as a zstd skippable frame that names the
// filter (filterHeader) followed by the zstd frame of the shuffled bytes;
// any zstd tool can still decompress it, to the shuffled bytes.
const (
	filterMagic    = 0x184D2A5C // one of zstd's skippable-frame magics
	filterShuffle8 = 1
)

var filterHeader = [9]byte{0x5C, 0x2A, 0x4D, 0x18, 1, 0, 0, 0, filterShuffle8}

// numeric reports whether b looks like an array of 8-byte numbers: in at
// least three quarters of 512 pairs of neighbouring words taken across it,
// the two words agree in their two high bytes (sign, exponent and the top
// of the mantissa of a float64; zero in small integers; the same region
// in pointers). Text and random bytes almost never do.
func numeric(b []byte) bool {
	const pairs = 512
	words := len(b)/8 - 1
	step := max(words/pairs, 1)
	same, total := 0, 0
	for i := 0; i < words; i += step {
		total++
		if le.Uint64(b[i*8:])>>48 == le.Uint64(b[i*8+8:])>>48 {
			same++
		}
	}
	return total > 0 && 4*same >= 3*total
}

// shuffle8 writes src's bytes grouped by their position in an 8-byte word
// into dst (of src's length): byte 0 of every word, then byte 1 of every
// word, and so on. Bytes after the last whole word are copied as they are.
func shuffle8(dst, src []byte) {
	n := len(src) / 8
	dst = dst[:len(src)]
	b := 0
	for ; b+8 <= n; b += 8 {
		s := src[b*8 : b*8+64]
		x0, x1, x2, x3, x4, x5, x6, x7 := transpose8(
			le.Uint64(s[0:]), le.Uint64(s[8:]), le.Uint64(s[16:]), le.Uint64(s[24:]),
			le.Uint64(s[32:]), le.Uint64(s[40:]), le.Uint64(s[48:]), le.Uint64(s[56:]))
		le.PutUint64(dst[b:], x0)
		le.PutUint64(dst[n+b:], x1)
		le.PutUint64(dst[2*n+b:], x2)
		le.PutUint64(dst[3*n+b:], x3)
		le.PutUint64(dst[4*n+b:], x4)
		le.PutUint64(dst[5*n+b:], x5)
		le.PutUint64(dst[6*n+b:], x6)
		le.PutUint64(dst[7*n+b:], x7)
	}
	for ; b < n; b++ {
		w := le.Uint64(src[b*8:])
		for c := range 8 {
			dst[c*n+b] = byte(w >> (8 * c))
		}
	}
	copy(dst[8*n:], src[8*n:])
}

// unshuffle8 undoes shuffle8.
func unshuffle8(dst, src []byte) {
	n := len(src) / 8
	dst = dst[:len(src)]
	b := 0
	for ; b+8 <= n; b += 8 {
		x0, x1, x2, x3, x4, x5, x6, x7 := transpose8(
			le.Uint64(src[b:]), le.Uint64(src[n+b:]), le.Uint64(src[2*n+b:]), le.Uint64(src[3*n+b:]),
			le.Uint64(src[4*n+b:]), le.Uint64(src[5*n+b:]), le.Uint64(src[6*n+b:]), le.Uint64(src[7*n+b:]))
		d := dst[b*8 : b*8+64]
		le.PutUint64(d[0:], x0)
		le.PutUint64(d[8:], x1)
		le.PutUint64(d[16:], x2)
		le.PutUint64(d[24:], x3)
		le.PutUint64(d[32:], x4)
		le.PutUint64(d[40:], x5)
		le.PutUint64(d[48:], x6)
		le.PutUint64(d[56:], x7)
	}
	for ; b < n; b++ {
		var w uint64
		for c := range 8 {
			w |= uint64(src[c*n+b]) << (8 * c)
		}
		le.PutUint64(dst[b*8:], w)
	}
	copy(dst[8*n:], src[8*n:])
}

var le = binary.LittleEndian

// transpose8 transposes the 8x8 matrix of bytes whose row r is xr (byte c
// of xr is column c): byte r of the c-th result is byte c of xr. It swaps
// 4x4, then 2x2, then 1x1 blocks across the diagonal.
func transpose8(x0, x1, x2, x3, x4, x5, x6, x7 uint64) (uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64) {
	const m4, m2, m1 = 0x00000000FFFFFFFF, 0x0000FFFF0000FFFF, 0x00FF00FF00FF00FF
	x0, x4 = swapBits(x0, x4, 32, m4)
	x1, x5 = swapBits(x1, x5, 32, m4)
	x2, x6 = swapBits(x2, x6, 32, m4)
	x3, x7 = swapBits(x3, x7, 32, m4)
	x0, x2 = swapBits(x0, x2, 16, m2)
	x1, x3 = swapBits(x1, x3, 16, m2)
	x4, x6 = swapBits(x4, x6, 16, m2)
	x5, x7 = swapBits(x5, x7, 16, m2)
	x0, x1 = swapBits(x0, x1, 8, m1)
	x2, x3 = swapBits(x2, x3, 8, m1)
	x4, x5 = swapBits(x4, x5, 8, m1)
	x6, x7 = swapBits(x6, x7, 8, m1)
	return x0, x1, x2, x3, x4, x5, x6, x7
}

// swapBits exchanges the bits of a selected by m<<s with the bits of b
// selected by m.
func swapBits(a, b uint64, s uint, m uint64) (uint64, uint64) {
	t := (a>>s ^ b) & m
	return a ^ t<<s, b ^ t
}

// decodeFrame decompresses a chunk file's bytes (compressChunk's output)
// into buf[:0].
func decodeFrame(z, buf []byte) ([]byte, error) {
	if len(z) < 4 || binary.LittleEndian.Uint32(z) != filterMagic {
		return decoder.DecodeAll(z, buf[:0])
	}
	if len(z) < len(filterHeader) || [9]byte(z[:9]) != filterHeader {
		return buf, errors.New("unknown filter frame")
	}
	sp := shuffleBufs.Get().(*[]byte)
	defer shuffleBufs.Put(sp)
	s, err := decoder.DecodeAll(z[len(filterHeader):], (*sp)[:0])
	*sp = s
	if err != nil {
		return buf, err
	}
	out := slices.Grow(buf[:0], len(s))[:len(s)]
	unshuffle8(out, s)
	return out, nil
}

var shuffleBufs = sync.Pool{New: func() any { b := make([]byte, 0, MaxChunk); return &b }}

// rawFrame appends b as a single-segment zstd frame of raw blocks (RFC
// 8878, 3.1.1): the magic, a header giving the content size in four bytes,
// then blocks of at most 128 KiB, each behind a three-byte header.
func rawFrame(b, dst []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, 0xFD2FB528)
	dst = append(dst, 2<<6|1<<5) // 4-byte content size, single segment
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(b)))
	for {
		n := min(len(b), rawBlockMax)
		hdr := uint32(n) << 3 // block type 0: raw
		if n == len(b) {
			hdr |= 1 // last block
		}
		dst = append(dst, byte(hdr), byte(hdr>>8), byte(hdr>>16))
		dst = append(dst, b[:n]...)
		b = b[n:]
		if len(b) == 0 {
			return dst
		}
	}
}
