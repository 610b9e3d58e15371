package memread

import (
	"encoding/hex"
	"math/rand/v2"
	"runtime"
	"testing"
)

func TestZeroDigest(t *testing.T) {
	// sha256sum of 4096 zero bytes.
	const want = "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7"
	if got := hex.EncodeToString(ZeroDigest[:]); got != want {
		t.Errorf("ZeroDigest = %s, want %s", got, want)
	}
	if PageDigest(make([]byte, PageSize)) != ZeroDigest {
		t.Error("PageDigest of a zero page is not ZeroDigest")
	}
}

func digestOf(i int) Digest {
	var d Digest
	d[0], d[1], d[2] = byte(i), byte(i>>8), byte(i>>16)
	d[31] = 1
	return d
}

// TestTrackerNoteSeen checks Note, Seen, Forget and Pages against a map,
// over pages noted in random order.
func TestTrackerNoteSeen(t *testing.T) {
	tr := NewTracker()
	type key struct {
		id   int
		addr uint64
	}
	ref := map[key]Digest{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		k := key{rng.IntN(3), 0x7f0000000000 + uint64(rng.IntN(1000))*PageSize}
		d := digestOf(i)
		tr.Note(k.id, k.addr, d)
		ref[k] = d
	}
	if tr.Pages() != int64(len(ref)) {
		t.Fatalf("Pages() = %d, want %d", tr.Pages(), len(ref))
	}
	for k, d := range ref {
		if !tr.Seen(k.id, k.addr, d) || !tr.Seen(k.id, k.addr+PageSize-1, d) {
			t.Fatalf("Seen(%d, %#x) false for the digest noted", k.id, k.addr)
		}
		if tr.Seen(k.id, k.addr, digestOf(-1)) {
			t.Fatalf("Seen(%d, %#x) true for another digest", k.id, k.addr)
		}
	}
	for _, tc := range []struct {
		name string
		id   int
		addr uint64
	}{
		{"unknown process", 7, 0x7f0000000000},
		{"unknown chunk", 0, 0x100000},
		{"page below", 0, 0x7f0000000000 - PageSize},
		{"page above", 0, 0x7f0000000000 + 1000*PageSize},
	} {
		if tr.Seen(tc.id, tc.addr, digestOf(0)) {
			t.Errorf("%s: Seen true", tc.name)
		}
	}
	n0 := int64(0)
	for k := range ref {
		if k.id == 0 {
			n0++
		}
	}
	tr.Forget(0)
	tr.Forget(0)
	if tr.Pages() != int64(len(ref))-n0 {
		t.Errorf("after Forget(0), Pages() = %d, want %d", tr.Pages(), int64(len(ref))-n0)
	}
	for k, d := range ref {
		if tr.Seen(k.id, k.addr, d) != (k.id != 0) {
			t.Fatalf("after Forget(0), Seen(%d, %#x) = %v", k.id, k.addr, k.id != 0)
		}
	}
}

func TestChunkDrop(t *testing.T) {
	for _, tc := range []struct {
		name          string
		present, drop uint64
		dropped       int
	}{
		{"nothing", 0b1011, 0, 0},
		{"one", 0b1011, 0b10, 1},
		{"absent pages", 0b1011, 0b100, 0},
		{"some absent", 0b1011, 0b1110, 2},
		{"all", 0b1011, ^uint64(0), 3},
		{"top page", 1<<63 | 1, 1 << 63, 1},
		{"full chunk, every other", ^uint64(0), 0x5555555555555555, 32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c chunk
			for i := range chunkPages {
				if tc.present&(1<<i) != 0 {
					c.set(1<<i, digestOf(i))
				}
			}
			if got := c.drop(tc.drop); got != tc.dropped {
				t.Errorf("dropped %d, want %d", got, tc.dropped)
			}
			if c.present != tc.present&^tc.drop || len(c.sums) != popcount(c.present) {
				t.Fatalf("present %b with %d digests, want %b", c.present, len(c.sums), tc.present&^tc.drop)
			}
			c.trim()
			for i := range chunkPages {
				if bit := uint64(1) << i; c.present&bit != 0 && c.sums[c.index(bit)] != digestOf(i) {
					t.Errorf("page %d has lost its digest", i)
				}
			}
		})
	}
}

func popcount(x uint64) int {
	n := 0
	for ; x != 0; x &= x - 1 {
		n++
	}
	return n
}

// TestTrackerMemory measures what a Tracker holds per page, for pages
// noted in address order as Scan records them: 1 GiB in runs, and pages
// scattered one per chunk, the worst case.
func TestTrackerMemory(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pages int
		addr  func(i int) uint64
		most  float64
	}{
		{"1 GiB in runs of 1000 pages", 1 << 30 / PageSize, func(i int) uint64 { return uint64(i+i/1000*24) * PageSize }, 40},
		{"one page per 256 KiB", 1 << 16, func(i int) uint64 { return uint64(i) * chunkPages * PageSize }, 130},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			tr := NewTracker()
			for i := range tc.pages {
				tr.Note(1, 0x7f0000000000+tc.addr(i), digestOf(i))
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			per := float64(after.HeapAlloc-before.HeapAlloc) / float64(tc.pages)
			t.Logf("%.1f bytes per tracked page", per)
			if per > tc.most {
				t.Errorf("%.1f bytes per tracked page, want at most %.0f", per, tc.most)
			}
			runtime.KeepAlive(tr)
		})
	}
}
