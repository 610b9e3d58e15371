package memread

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrGone is what Scan and Regions wrap when the process has exited.
var ErrGone = errors.New("process is gone")

// Run is a run of consecutive pages at Addr, their content and digests.
type Run struct {
	Addr    uint64
	Data    []byte // len(Digests)*PageSize bytes; valid only during the callback
	Digests []Digest
}

// ScanStats counts what a scan looked at.
type ScanStats struct {
	Pages   int64 // present (or swapped) pages read
	Changed int64 // pages passed to fn: never seen before, or digest differs from the last scan
	Zero    int64 // of the changed, pages that are all zeros
	Gone    int64 // pages seen by the last scan that are no longer present (unmapped or discarded)
}

const (
	// batchPages is the most pages one process_vm_readv reads: 1 MiB.
	batchPages = 1 << 20 / PageSize
	// pagemapEntries is how many pagemap entries are read at once: 32 KiB
	// of them, for 16 MiB of address space.
	pagemapEntries = 4096
	// maxWorkers bounds the goroutines that read and digest, and so the
	// batches in flight (two per worker).
	maxWorkers = 16

	pmPresent = 1 << 63 // pagemap: the page is in memory
	pmSwapped = 1 << 62 // pagemap: the page is in swap
)

// scanner holds a Tracker's buffers for Scan, kept from one to the next.
type scanner struct {
	regs []Region
	maps *bufio.Reader
	fr   fdReader
	pm   []byte // pagemap entries

	all    []*batch // every batch buffer, two per worker
	free   []*batch
	flight []*batch // handed to the workers, oldest first

	// Set by each Scan, read by its workers.
	pid  int
	todo chan *batch
}

// batch is up to 1 MiB of pages to read and digest, with what a worker
// found: a Scan fills addrs, a worker reads and digests them, the Scan
// compares the digests and passes the runs on.
type batch struct {
	addrs []uint64
	first []bool // the page is the first of its region in the batch
	ok    []bool // the page was read
	sums  []Digest
	buf   []byte // the pages' content
	iovs  []unix.RemoteIovec
	local [1]unix.Iovec
	err   error
	done  chan struct{} // a worker is done with it
}

func newBatch() *batch {
	return &batch{
		addrs: make([]uint64, 0, batchPages),
		first: make([]bool, 0, batchPages),
		ok:    make([]bool, batchPages),
		sums:  make([]Digest, batchPages),
		buf:   make([]byte, batchPages*PageSize),
		iovs:  make([]unix.RemoteIovec, 0, batchPages),
		done:  make(chan struct{}, 1),
	}
}

func newScanner() *scanner {
	s := &scanner{pm: make([]byte, pagemapEntries*8)}
	s.maps = bufio.NewReaderSize(&s.fr, mapsBuffer)
	return s
}

// scan is the state of one Scan.
type scan struct {
	t     *Tracker
	s     *scanner
	tb    *table
	ctx   context.Context
	fn    func(Run) error
	stats ScanStats
	// The chunk last looked up, and its key.
	c    *chunk
	ckey uint64
	// The batch being finished, and the page of it being compared.
	b *batch
	j int
}

// Scan reads the memory of process pid (a PID as this process sees it)
// without stopping it, and calls fn for each run of its pages that changed
// since the Tracker last recorded them under id (the caller's name for the
// process, e.g. its PID in the job's namespace).
//
// It lists the Regions, reads /proc/PID/pagemap to find their pages that
// are present or swapped (a page never touched is skipped, and so never
// faulted in), reads those with process_vm_readv in batches of up to 1 MiB
// and digests each, on up to GOMAXPROCS goroutines (16 at most, each with
// two batches in flight). A page is changed when the Tracker holds no
// digest for it or a different one. fn gets each maximal run of
// consecutive changed pages, in address order, cut where a region or a
// 1 MiB batch ends (so never longer than 1 MiB); its Data and Digests are
// valid only during the call. Once fn returns nil the Tracker records the
// run's digests; an error from fn ends the Scan and is returned wrapped,
// the run's pages keeping what was recorded before.
//
// A page that cannot be read (unmapped or made unreadable meanwhile, or in
// a region without read permission) is skipped. When the Scan completes,
// the pages recorded before that it did not read are forgotten and counted
// in Gone. A Scan that fails keeps what fn accepted and forgets nothing.
// The counts in ScanStats are of the whole process.
//
// The process exiting gives an error wrapping ErrGone. ctx is checked
// between batches, and every 16 MiB of address space looked up in
// pagemap.
func (t *Tracker) Scan(ctx context.Context, id, pid int, fn func(Run) error) (ScanStats, error) {
	if t.s == nil {
		t.s = newScanner()
	}
	s := t.s
	regs, err := readRegions(pid, s.maps, &s.fr, s.regs)
	s.regs = regs
	if err != nil {
		return ScanStats{}, err
	}
	pmPath := "/proc/" + strconv.Itoa(pid) + "/pagemap"
	pm, err := openProc(pmPath)
	if err != nil {
		return ScanStats{}, procErr(pid, pmPath, err)
	}
	defer unix.Close(pm)

	s.start(pid)
	defer s.stop()
	tb := t.table(id)
	tb.gen++
	sc := &scan{t: t, s: s, tb: tb, ctx: ctx, fn: fn}
	var b *batch
	for _, r := range regs {
		if !r.Readable {
			continue
		}
		first := true
		for a := r.Start; a < r.End; {
			if err := ctx.Err(); err != nil { // a TiB of address space is half a second of pagemap
				return sc.stats, fmt.Errorf("pid %d: scan stopped: %w", pid, err)
			}
			n := min((r.End-a)/PageSize, pagemapEntries)
			e := s.pm[:n*8]
			m, err := pread(pm, e, int64(a/PageSize*8))
			if err != nil {
				return sc.stats, procErr(pid, fmt.Sprintf("%s at %#x", pmPath, a), err)
			}
			if m < 8 {
				// The kernel ends the file early only for a process
				// whose address space is gone.
				return sc.stats, fmt.Errorf("pid %d: %s at %#x: no entries: %w", pid, pmPath, a, ErrGone)
			}
			for i := 0; i < m/8; i++ {
				if binary.NativeEndian.Uint64(e[i*8:])&(pmPresent|pmSwapped) == 0 {
					continue
				}
				if b == nil {
					if b, err = sc.next(); err != nil {
						return sc.stats, err
					}
				}
				b.addrs = append(b.addrs, a+uint64(i)*PageSize)
				b.first = append(b.first, first)
				first = false
				if len(b.addrs) == batchPages {
					if err := sc.dispatch(b); err != nil {
						return sc.stats, err
					}
					b = nil
				}
			}
			a += uint64(m/8) * PageSize
		}
	}
	if b != nil {
		if err := sc.dispatch(b); err != nil {
			return sc.stats, err
		}
	}
	for len(s.flight) > 0 {
		if err := sc.finish(); err != nil {
			return sc.stats, err
		}
	}
	sc.stats.Gone = t.sweep(tb)
	return sc.stats, nil
}

// start starts the goroutines that read and digest batches.
func (s *scanner) start(pid int) {
	s.pid = pid
	n := min(max(1, runtime.GOMAXPROCS(0)), maxWorkers)
	for len(s.all) < 2*n {
		s.all = append(s.all, newBatch())
	}
	s.free = append(s.free[:0], s.all...)
	s.flight = s.flight[:0]
	s.todo = make(chan *batch, len(s.all))
	for range n {
		go func(todo <-chan *batch) {
			for b := range todo {
				s.read(b)
				b.done <- struct{}{}
			}
		}(s.todo)
	}
}

// stop waits for the batches still in flight and ends the goroutines
// start started.
func (s *scanner) stop() {
	for _, b := range s.flight {
		<-b.done
	}
	s.flight = s.flight[:0]
	close(s.todo)
	s.todo = nil
}

// next returns an empty batch: a free one, or the oldest in flight once it
// is finished.
func (sc *scan) next() (*batch, error) {
	s := sc.s
	if len(s.free) == 0 {
		if err := sc.finish(); err != nil {
			return nil, err
		}
	}
	b := s.free[len(s.free)-1]
	s.free = s.free[:len(s.free)-1]
	b.addrs, b.first = b.addrs[:0], b.first[:0]
	return b, nil
}

// dispatch hands a filled batch to the workers.
func (sc *scan) dispatch(b *batch) error {
	s := sc.s
	if err := sc.ctx.Err(); err != nil {
		s.free = append(s.free, b)
		return fmt.Errorf("pid %d: scan stopped: %w", s.pid, err)
	}
	s.flight = append(s.flight, b)
	s.todo <- b
	return nil
}

// finish waits for the oldest batch in flight, passes the runs of its
// changed pages to fn, records them, and frees the batch.
func (sc *scan) finish() error {
	s := sc.s
	b := s.flight[0]
	copy(s.flight, s.flight[1:])
	s.flight = s.flight[:len(s.flight)-1]
	<-b.done
	s.free = append(s.free, b)
	if b.err != nil {
		return b.err
	}
	sc.b = b
	lo := -1 // the start of the current run
	for j := range b.addrs {
		sc.j = j
		changed := b.ok[j] && sc.changed(b.addrs[j], b.sums[j])
		if b.ok[j] {
			sc.stats.Pages++
		}
		if lo >= 0 && (!changed || b.first[j] || b.addrs[j] != b.addrs[j-1]+PageSize) {
			if err := sc.emit(b, lo, j); err != nil {
				return err
			}
			lo = -1
		}
		if changed && lo < 0 {
			lo = j
		}
	}
	if lo >= 0 {
		return sc.emit(b, lo, len(b.addrs))
	}
	return nil
}

// emit passes the pages [lo, hi) of batch b to fn as a Run, and once fn
// accepts them records their digests.
func (sc *scan) emit(b *batch, lo, hi int) error {
	r := Run{
		Addr:    b.addrs[lo],
		Data:    b.buf[lo*PageSize : hi*PageSize : hi*PageSize],
		Digests: b.sums[lo:hi:hi],
	}
	if err := sc.fn(r); err != nil {
		return fmt.Errorf("pid %d: pages %#x-%#x: %w", sc.s.pid, r.Addr, r.Addr+uint64(len(r.Data)), err)
	}
	sc.stats.Changed += int64(hi - lo)
	for j := lo; j < hi; j++ {
		if b.sums[j] == ZeroDigest {
			sc.stats.Zero++
		}
		pn := b.addrs[j] / PageSize
		sc.t.set(sc.tb, sc.chunk(pn), pn, b.sums[j])
	}
	return nil
}

// changed marks the page at addr as found by this scan, and reports
// whether its digest d differs from the one recorded, or none is.
func (sc *scan) changed(addr uint64, d Digest) bool {
	pn := addr / PageSize
	c := sc.chunk(pn)
	bit := uint64(1) << (pn % chunkPages)
	c.seen |= bit
	return c.present&bit == 0 || c.sums[c.index(bit)] != d
}

// chunk returns the chunk of page number pn, made if there is none (with
// room for the batch's pages from the one being compared on that fall in
// it), its seen bits cleared when this scan first comes to it.
func (sc *scan) chunk(pn uint64) *chunk {
	k := pn / chunkPages
	if sc.c != nil && sc.ckey == k {
		return sc.c
	}
	c := sc.tb.chunks[k]
	if c == nil {
		n := 0
		for _, a := range sc.b.addrs[sc.j:min(sc.j+chunkPages, len(sc.b.addrs))] {
			if a/PageSize/chunkPages == k {
				n++
			}
		}
		c = &chunk{gen: sc.tb.gen, sums: make([]Digest, 0, max(n, 1))}
		sc.tb.chunks[k] = c
	}
	if c.gen != sc.tb.gen {
		c.gen, c.seen = sc.tb.gen, 0
	}
	sc.c, sc.ckey = c, k
	return c
}

// read reads the pages of b into b.buf and digests them, setting b.ok for
// those it could read. A page that cannot be read is skipped:
// process_vm_readv stops at the first such page, and the read goes on
// after it.
func (s *scanner) read(b *batch) {
	b.err = nil
	n := len(b.addrs)
	for i := 0; i < n; {
		b.iovs = b.iovs[:0]
		for j := i; j < n; j++ {
			if j > i && b.addrs[j] == b.addrs[j-1]+PageSize {
				b.iovs[len(b.iovs)-1].Len += PageSize
			} else {
				b.iovs = append(b.iovs, unix.RemoteIovec{Base: uintptr(b.addrs[j]), Len: PageSize})
			}
		}
		want := (n - i) * PageSize
		b.local[0].Base = &b.buf[i*PageSize]
		b.local[0].SetLen(want)
		got, err := unix.ProcessVMReadv(s.pid, b.local[:], b.iovs, 0)
		switch err {
		case nil, unix.EFAULT, unix.EIO, unix.EHWPOISON:
		case unix.EINTR:
			continue
		default:
			b.err = procErr(s.pid, fmt.Sprintf("process_vm_readv at %#x", b.addrs[i]), err)
			return
		}
		k := i + max(got, 0)/PageSize
		for ; i < k; i++ {
			b.ok[i] = true
			b.sums[i] = PageDigest(b.buf[i*PageSize : (i+1)*PageSize])
		}
		if i < n && (err != nil || got < want) {
			b.ok[i] = false // the page it stopped at
			i++
		}
	}
}

// pread reads from fd at off, again if interrupted.
func pread(fd int, b []byte, off int64) (int, error) {
	for {
		n, err := unix.Pread(fd, b, off)
		if err != unix.EINTR {
			return n, err
		}
	}
}
