package store

import (
	"encoding/binary"

	"github.com/klauspost/compress/zstd"
)

// Memory that does not compress (random numbers, already compressed data)
// still costs zstd most of its time to find that out. A chunk is probed
// first, at its start and in its middle; when neither sample shrinks, the
// chunk is stored as a zstd frame of raw blocks, which every zstd decoder
// reads, for the price of a copy.

const (
	probeLen    = 16 << 10
	rawBlockMax = 128 << 10 // zstd's largest block
)

// compressChunk appends b, compressed into one zstd frame, to dst[:0].
// probe is scratch space of at least probeLen+64 bytes.
func compressChunk(enc *zstd.Encoder, b, dst, probe []byte) ([]byte, []byte) {
	if len(b) >= 4*probeLen {
		mid := len(b) / 2 &^ (probeLen - 1)
		probe = enc.EncodeAll(b[:probeLen], probe[:0])
		if len(probe) >= probeLen-probeLen/64 {
			probe = enc.EncodeAll(b[mid:mid+probeLen], probe[:0])
			if len(probe) >= probeLen-probeLen/64 {
				return rawFrame(b, dst[:0]), probe
			}
		}
	}
	return enc.EncodeAll(b, dst[:0]), probe
}

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
