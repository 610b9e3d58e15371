package memread

import "math/bits"

// chunkPages is how many consecutive pages one chunk of a Tracker covers
// (256 KiB of address space): one bit each in a uint64.
const chunkPages = 64

// Tracker remembers, per process and page address, the digest of the page
// as last scanned (or noted).
//
// Memory: 32 bytes per tracked page (its digest), plus about 100 bytes per
// 256 KiB of address space that holds any tracked page (a chunk: two
// bitmaps, its digests' slice, a map slot). Memory touched in runs, as a
// job's arrays and heap are, costs about 34 bytes a page
// (TestTrackerMemory and BenchmarkScan measure it: 33-34); a page alone in
// its 256 KiB costs about 115. Besides that, the first Scan
// allocates its buffers, kept for the next: two 1 MiB batches per worker
// goroutine (GOMAXPROCS of them, at most 16), so from about 2 MiB on one
// core to 34 MiB.
//
// A Tracker is safe for use by one goroutine.
type Tracker struct {
	procs map[int]*table
	pages int64
	s     *scanner // a Scan's buffers, made by the first
}

// table is what a Tracker holds about one process.
type table struct {
	// chunks maps a page number (address / PageSize) divided by
	// chunkPages to the chunk of those pages. A chunk may be empty.
	chunks map[uint64]*chunk
	// gen is the number of the last Scan begun.
	gen   uint32
	pages int64
}

// chunk holds the digests of the tracked pages among chunkPages
// consecutive pages.
type chunk struct {
	present uint64 // bit i: page i of the chunk is tracked, its digest in sums
	// seen bit i: Scan number gen found page i (when gen is the table's
	// gen; stale before).
	seen uint64
	gen  uint32
	sums []Digest // the digests of the tracked pages, in address order
}

// NewTracker returns an empty Tracker.
func NewTracker() *Tracker {
	return &Tracker{procs: map[int]*table{}}
}

// Seen reports whether the page at addr (rounded down to its page) of
// process id is recorded, by the last Scan or by Note, with digest d.
func (t *Tracker) Seen(id int, addr uint64, d Digest) bool {
	tb := t.procs[id]
	if tb == nil {
		return false
	}
	pn := addr / PageSize
	c := tb.chunks[pn/chunkPages]
	if c == nil {
		return false
	}
	bit := uint64(1) << (pn % chunkPages)
	return c.present&bit != 0 && c.sums[c.index(bit)] == d
}

// Note records digest d for the page at addr (rounded down to its page) of
// process id. A later Scan forgets it like any other page, unless it finds
// the page.
func (t *Tracker) Note(id int, addr uint64, d Digest) {
	tb := t.table(id)
	pn := addr / PageSize
	c := tb.chunks[pn/chunkPages]
	if c == nil {
		c = &chunk{gen: tb.gen}
		tb.chunks[pn/chunkPages] = c
	}
	t.set(tb, c, pn, d)
}

// Forget drops everything recorded for process id.
func (t *Tracker) Forget(id int) {
	if tb := t.procs[id]; tb != nil {
		t.pages -= tb.pages
		delete(t.procs, id)
	}
}

// Pages returns how many pages are tracked, of all processes.
func (t *Tracker) Pages() int64 {
	return t.pages
}

// table returns the table of process id, made if there is none.
func (t *Tracker) table(id int) *table {
	tb := t.procs[id]
	if tb == nil {
		tb = &table{chunks: map[uint64]*chunk{}}
		t.procs[id] = tb
	}
	return tb
}

// set records digest d for page number pn, of chunk c of table tb.
func (t *Tracker) set(tb *table, c *chunk, pn uint64, d Digest) {
	if c.set(uint64(1)<<(pn%chunkPages), d) {
		tb.pages++
		t.pages++
	}
}

// sweep ends Scan number tb.gen, which found what it found: it forgets
// the pages it did not find and returns how many.
func (t *Tracker) sweep(tb *table) int64 {
	var gone int64
	for k, c := range tb.chunks {
		lost := c.present
		if c.gen == tb.gen {
			lost &^= c.seen
		}
		gone += int64(c.drop(lost))
		if c.present == 0 {
			delete(tb.chunks, k)
			continue
		}
		c.trim()
	}
	tb.pages -= gone
	t.pages -= gone
	return gone
}

// index is the position in c.sums of the page whose bit is bit.
func (c *chunk) index(bit uint64) int {
	return bits.OnesCount64(c.present & (bit - 1))
}

// set records digest d for the page whose bit is bit, and reports whether
// the page is new to the chunk. sums grows by doubling, to chunkPages at
// most (a Scan makes a chunk with room for the pages it is about to
// record); trim gives back what a scan did not fill.
func (c *chunk) set(bit uint64, d Digest) bool {
	i := c.index(bit)
	if c.present&bit != 0 {
		c.sums[i] = d
		return false
	}
	n := len(c.sums)
	if n == cap(c.sums) {
		s := make([]Digest, n, min(max(1, 2*n), chunkPages))
		copy(s, c.sums)
		c.sums = s
	}
	c.sums = c.sums[:n+1]
	copy(c.sums[i+1:], c.sums[i:n])
	c.sums[i] = d
	c.present |= bit
	return true
}

// drop forgets the pages of mask and returns how many of them were
// tracked.
func (c *chunk) drop(mask uint64) int {
	mask &= c.present
	if mask == 0 {
		return 0
	}
	j := 0
	for i, p := 0, c.present; p != 0; i, p = i+1, p&(p-1) {
		if mask&(p&-p) == 0 {
			c.sums[j] = c.sums[i]
			j++
		}
	}
	c.sums = c.sums[:j]
	c.present &^= mask
	return bits.OnesCount64(mask)
}

// trim gives back the room in sums beyond an eighth of its length and a
// few digests.
func (c *chunk) trim() {
	if n := len(c.sums); cap(c.sums)-n > n/8+2 {
		c.sums = append([]Digest(nil), c.sums...)
	}
}
