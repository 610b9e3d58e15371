package store

import (
	"bytes"
	"encoding/binary"
	"math"
	"testing"
)

// floats is n bytes of a float64 array holding a smooth field, as a
// simulation's state (the bench workload's): the case the shuffle filter
// is for.
func floats(n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		x := float64(i/8) / (1 << 18)
		v := 293.15 + 4*math.Sin(2*math.Pi*x) + 0.5*math.Cos(7*x)
		binary.LittleEndian.PutUint64(b[i:], math.Float64bits(math.Round(v*1024)/1024))
	}
	return b
}

// TestCompressChunk: random data is stored as raw blocks (no bigger than
// the data plus headers), compressible data compresses, arrays of numbers
// are shuffled, and every chunk decodes to what went in, including edge
// sizes around a block and lengths that are not whole words.
func TestCompressChunk(t *testing.T) {
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	text := bytes.Repeat([]byte("step 000123 residual 1.2e-07 dt 0.001\n"), 14000)[:512<<10]
	cases := map[string][]byte{
		"random":        randBytes(7, 512<<10),
		"text":          text,
		"random+text":   append(randBytes(8, 256<<10), text[:256<<10]...),
		"small random":  randBytes(9, 1000),
		"one block":     randBytes(10, rawBlockMax),
		"block+1":       randBytes(11, rawBlockMax+1),
		"empty":         {},
		"floats":        floats(MaxChunk),
		"floats+5":      floats(MaxChunk/2 + 5),
		"floats+text":   append(floats(256<<10), text[:256<<10]...), // either way, it must round-trip
		"floats 64 KiB": floats(4 * probeLen),
	}
	for name, b := range cases {
		z := cd.compress(b)
		got, err := decodeFrame(z, nil)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s: round trip failed: %v", name, err)
		}
		shuffled := bytes.HasPrefix(z, filterHeader[:])
		if strings := name == "text" || name == "random" || name == "random+text"; strings && shuffled {
			t.Errorf("%s: shuffled, but shuffling bytes does not help it", name)
		}
		if (name == "floats" || name == "floats+5" || name == "floats 64 KiB") && !shuffled {
			t.Errorf("%s: not shuffled", name)
		}
		if name == "random" && len(z) > len(b)+64 {
			t.Errorf("random: %d bytes stored for %d", len(z), len(b))
		}
		if (name == "text" || name == "random+text") && len(z) > len(b)*3/4 {
			t.Errorf("%s: %d bytes stored for %d, want it compressed", name, len(z), len(b))
		}
		// The filter must pay: plain zstd of this field is about 0.1x.
		if name == "floats" && len(z) > len(b)/40 {
			t.Errorf("floats: %d bytes stored for %d, want under 1/40", len(z), len(b))
		}
		// Same content, same bytes: chunk files are compared and healed by content.
		if z2 := cd.compress(b); !bytes.Equal(z, z2) && name != "empty" {
			t.Errorf("%s: compressing twice gave different bytes", name)
		}
	}
	for _, n := range []int{0, 1, rawBlockMax - 1, rawBlockMax, rawBlockMax + 1, 3 * rawBlockMax, MaxChunk} {
		b := randBytes(int64(n), n)
		got, err := decodeFrame(rawFrame(b, nil), nil)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("raw frame of %d bytes: %v", n, err)
		}
	}
}

// TestShuffle8: shuffle8 groups bytes by their place in a word (checked
// against the definition), unshuffle8 undoes it, for every length class.
func TestShuffle8(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 63, 64, 65, 71, 72, 4096, 4096 + 3, 1000003} {
		src := randBytes(int64(n)+1, n)
		got := make([]byte, n)
		shuffle8(got, src)
		w := n / 8
		want := make([]byte, n)
		for i := 0; i < 8*w; i++ {
			want[(i%8)*w+i/8] = src[i]
		}
		copy(want[8*w:], src[8*w:])
		if !bytes.Equal(got, want) {
			t.Fatalf("shuffle8 of %d bytes is wrong", n)
		}
		back := make([]byte, n)
		unshuffle8(back, got)
		if !bytes.Equal(back, src) {
			t.Fatalf("unshuffle8 does not undo shuffle8 for %d bytes", n)
		}
	}
}

// TestDecodeFrameRefusesUnknownFilter: a filter frame cryo did not write
// (a damaged header, or a newer filter) is an error, not garbage.
func TestDecodeFrameRefusesUnknownFilter(t *testing.T) {
	cd, err := newCoder()
	if err != nil {
		t.Fatal(err)
	}
	z := append([]byte(nil), cd.compress(floats(MaxChunk))...)
	for _, i := range []int{4, 8} {
		bad := append([]byte(nil), z...)
		bad[i] ^= 0x40
		if _, err := decodeFrame(bad, nil); err == nil {
			t.Errorf("byte %d of the filter header flipped: decoded without error", i)
		}
	}
}

// BenchmarkShuffle8 measures the filter both ways on a field.
func BenchmarkShuffle8(b *testing.B) {
	for _, fn := range []struct {
		name string
		f    func(dst, src []byte)
	}{{"shuffle", shuffle8}, {"unshuffle", unshuffle8}} {
		b.Run(fn.name, func(b *testing.B) {
			src := floats(MaxChunk)
			dst := make([]byte, MaxChunk)
			b.SetBytes(MaxChunk)
			for b.Loop() {
				fn.f(dst, src)
			}
		})
	}
}
