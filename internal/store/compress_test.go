package store

import (
	"bytes"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// TestCompressChunk: random data is stored as raw blocks (no bigger than
// the data plus headers), compressible data compresses, and every frame
// decodes to what went in, including edge sizes around a block.
func TestCompressChunk(t *testing.T) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	text := bytes.Repeat([]byte("step 000123 residual 1.2e-07 dt 0.001\n"), 14000)[:512<<10]
	cases := map[string][]byte{
		"random":       randBytes(7, 512<<10),
		"text":         text,
		"random+text":  append(randBytes(8, 256<<10), text[:256<<10]...),
		"small random": randBytes(9, 1000),
		"one block":    randBytes(10, rawBlockMax),
		"block+1":      randBytes(11, rawBlockMax+1),
		"empty":        {},
	}
	probe := make([]byte, probeLen+64)
	for name, b := range cases {
		var z []byte
		z, probe = compressChunk(enc, b, nil, probe)
		got, err := decoder.DecodeAll(z, nil)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s: round trip failed: %v", name, err)
		}
		if name == "random" && len(z) > len(b)+64 {
			t.Errorf("random: %d bytes stored for %d", len(z), len(b))
		}
		if (name == "text" || name == "random+text") && len(z) > len(b)*3/4 {
			t.Errorf("%s: %d bytes stored for %d, want it compressed", name, len(z), len(b))
		}
	}
	for _, n := range []int{0, 1, rawBlockMax - 1, rawBlockMax, rawBlockMax + 1, 3 * rawBlockMax, MaxChunk} {
		b := randBytes(int64(n), n)
		got, err := decoder.DecodeAll(rawFrame(b, nil), nil)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("raw frame of %d bytes: %v", n, err)
		}
	}
}
