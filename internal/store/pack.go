package store

// Pack files. A parallel file system's metadata server, not its bandwidth,
// decides how fast a store of many small files is written, so a generation
// puts its chunks into a few large append-only files, packs/<id>.pack:
//
//	record*    a 96-byte header (kind, name, base, lengths, CRCs), then the blob
//	index      a 104-byte entry per record: its offset and a copy of its header
//	footer     32 bytes: magic, entry count, where the index starts, CRCs
//
// A blob is what a chunk file held in store format 1 (a zstd frame, maybe
// behind a filter frame), or a delta (delta.go). Readers load the index of every pack (one read of its end)
// and read blobs by offset, with O_DIRECT where the file system takes it.
// A pack whose end is damaged or cut short is read record by record from
// its start instead (each header carries its own CRC), so that damage
// costs the blobs it hit, not the pack.
//
// A pack is written as packs/<id>.tmp: records are appended into aligned
// buffers that go to the disk with O_DIRECT, whole blocks at a time, by the
// worker that filled them; the last block, the index and the footer go
// through the page cache. A finished pack is fsynced and only then renamed
// to <id>.pack, so that a .pack file is always durable and whole, and a
// crash leaves at worst a .tmp that CleanStaging removes. Packs are never
// changed after that; GC removes or repacks them (gc.go).

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	recMagic    = 0x43525943 // "CYRC"
	recHeader   = 96
	indexEntry  = 8 + recHeader
	footerLen   = 32
	footerMagic = "CRYOPAK\x01"

	kindFull  = 1 // a chunk's content, compressed
	kindDelta = 2 // a chunk as the pages that differ from its base

	flagZeroBase = 1 // a delta on a zero chunk (no blob)

	// maxPackEntries bounds a pack's index before it is read.
	maxPackEntries = 1 << 20
)

// record is one blob's header.
type record struct {
	kind     uint8
	zeroBase bool
	hash     [32]byte
	base     [32]byte
	n, z     uint32 // content length (pages for a table); blob length
	check    uint64 // fileCheck of the blob
}

func (r record) encode(b []byte) {
	_ = b[recHeader-1]
	binary.LittleEndian.PutUint32(b[0:], recMagic)
	b[4] = r.kind
	b[5] = 0
	if r.zeroBase {
		b[5] = flagZeroBase
	}
	b[6], b[7] = 0, 0
	copy(b[8:40], r.hash[:])
	copy(b[40:72], r.base[:])
	binary.LittleEndian.PutUint32(b[72:], r.n)
	binary.LittleEndian.PutUint32(b[76:], r.z)
	binary.LittleEndian.PutUint64(b[80:], r.check)
	binary.LittleEndian.PutUint32(b[88:], crc32.Checksum(b[:88], castagnoli))
	binary.LittleEndian.PutUint32(b[92:], 0)
}

func decodeRecord(b []byte) (record, error) {
	var r record
	if len(b) < recHeader || binary.LittleEndian.Uint32(b) != recMagic {
		return r, errors.New("not a record header")
	}
	if binary.LittleEndian.Uint32(b[88:]) != crc32.Checksum(b[:88], castagnoli) {
		return r, errors.New("record header fails its CRC")
	}
	r.kind, r.zeroBase = b[4], b[5]&flagZeroBase != 0
	copy(r.hash[:], b[8:40])
	copy(r.base[:], b[40:72])
	r.n = binary.LittleEndian.Uint32(b[72:])
	r.z = binary.LittleEndian.Uint32(b[76:])
	r.check = binary.LittleEndian.Uint64(b[80:])
	switch {
	case r.kind != kindFull && r.kind != kindDelta:
		return r, fmt.Errorf("record of unknown kind %d", r.kind)
	case r.z > maxStored:
		return r, fmt.Errorf("record of %d bytes, more than any blob", r.z)
	case r.n > MaxChunk:
		return r, fmt.Errorf("chunk of %d bytes, more than %d", r.n, MaxChunk)
	}
	return r, nil
}

func checkString(c uint64) string {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], c)
	return hex.EncodeToString(b[:])
}

func fileCheckBits(z []byte) uint64 {
	return uint64(crc32.Checksum(z, castagnoli))<<32 | uint64(crc32.ChecksumIEEE(z))
}

func hashBytes(h string) ([32]byte, bool) {
	var out [32]byte
	if len(h) != 64 {
		return out, false
	}
	_, err := hex.Decode(out[:], []byte(h))
	return out, err == nil
}

// blobLoc is where a blob is.
type blobLoc struct {
	p   *packFile
	off int64 // of the blob, past its header
	record
}

// packFile is one finished pack.
type packFile struct {
	name    string // file name in packs/
	size    int64
	entries []blobLoc
	scanned string // why its index was rebuilt by reading every record ("" if not)

	mu     sync.Mutex
	f      *os.File
	direct bool
}

func (p *packFile) rel() string { return "packs/" + p.name }

func isPackTemp(name string) bool { return strings.HasSuffix(name, ".tmp") }

// newPackID is a random name for a new pack.
func newPackID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// packIndex is every finished pack's index, loaded from the packs.
type packIndex struct {
	mu    sync.Mutex
	packs map[string]*packFile
	blobs map[[32]byte][]blobLoc // chunks (full and delta)
}

// index loads the index of every pack that is new since the last call and
// forgets packs that are gone.
func (s *Store) index() (*packIndex, error) {
	ix := &s.idx
	ents, err := s.r.readDir("packs")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			ents = nil
		} else {
			return nil, err
		}
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.packs == nil {
		ix.packs = map[string]*packFile{}
	}
	seen := map[string]bool{}
	changed := false
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".pack") || !e.Type().IsRegular() {
			continue
		}
		seen[name] = true
		if p := ix.packs[name]; p != nil {
			// Packs never change; one that did (cut short, replaced) is
			// read anew.
			if info, err := e.Info(); err != nil || info.Size() == p.size {
				continue
			}
			p.close()
			delete(ix.packs, name)
			changed = true
		}
		p, err := s.loadPack(name)
		if err != nil {
			// An unreadable pack holds nothing we can use; its chunks
			// are reported missing by whoever needs them.
			continue
		}
		ix.packs[name] = p
		changed = true
	}
	for name, p := range ix.packs {
		if !seen[name] {
			p.close()
			delete(ix.packs, name)
			changed = true
		}
	}
	if changed || ix.blobs == nil {
		ix.rebuild()
	}
	return ix, nil
}

func (ix *packIndex) rebuild() {
	ix.blobs = map[[32]byte][]blobLoc{}
	for _, p := range ix.packs {
		ix.addLocked(p)
	}
}

func (ix *packIndex) addLocked(p *packFile) {
	for _, l := range p.entries {
		ix.blobs[l.hash] = append(ix.blobs[l.hash], l)
	}
}

// add makes a pack this process just finished known.
func (ix *packIndex) add(p *packFile) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.packs == nil {
		ix.packs = map[string]*packFile{}
	}
	if ix.packs[p.name] != nil {
		return
	}
	ix.packs[p.name] = p
	if ix.blobs == nil {
		ix.rebuild()
		return
	}
	ix.addLocked(p)
}

// lookup returns the locations of the chunk named h.
func (ix *packIndex) lookup(h [32]byte) []blobLoc {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	return ix.blobs[h]
}

func (ix *packIndex) list() []*packFile {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	out := make([]*packFile, 0, len(ix.packs))
	for _, p := range ix.packs {
		out = append(out, p)
	}
	return out
}

// loadPack reads a pack's index from its end, or, when that is damaged,
// from its records.
func (s *Store) loadPack(name string) (*packFile, error) {
	p := &packFile{name: name}
	f, err := s.r.open(p.rel(), unix.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	p.size = st.Size()
	if err := p.readIndex(f); err != nil {
		p.entries = nil
		p.scanned = err.Error()
		p.scan(f)
	}
	return p, nil
}

func (p *packFile) readIndex(f *os.File) error {
	if p.size < footerLen {
		return errors.New("shorter than a pack's footer")
	}
	var ft [footerLen]byte
	if _, err := f.ReadAt(ft[:], p.size-footerLen); err != nil {
		return err
	}
	if string(ft[:8]) != footerMagic || binary.LittleEndian.Uint32(ft[28:]) != crc32.Checksum(ft[:28], castagnoli) {
		return errors.New("no intact footer")
	}
	count := int64(binary.LittleEndian.Uint32(ft[8:]))
	at := int64(binary.LittleEndian.Uint64(ft[16:]))
	if count > maxPackEntries || at < 0 || at+count*indexEntry+footerLen != p.size {
		return fmt.Errorf("footer says %d entries at %d in %d bytes", count, at, p.size)
	}
	ib := make([]byte, count*indexEntry)
	if _, err := f.ReadAt(ib, at); err != nil {
		return err
	}
	if crc32.Checksum(ib, castagnoli) != binary.LittleEndian.Uint32(ft[24:]) {
		return errors.New("index fails its CRC")
	}
	p.entries = make([]blobLoc, 0, count)
	for i := int64(0); i < count; i++ {
		e := ib[i*indexEntry:]
		off := int64(binary.LittleEndian.Uint64(e))
		r, err := decodeRecord(e[8:])
		if err != nil {
			return fmt.Errorf("index entry %d: %w", i, err)
		}
		if off < recHeader || off+int64(r.z) > at {
			return fmt.Errorf("index entry %d: blob at %d+%d past the records", i, off, r.z)
		}
		p.entries = append(p.entries, blobLoc{p: p, off: off, record: r})
	}
	return nil
}

// scan rebuilds the index from the records, up to the first that does not
// read.
func (p *packFile) scan(f *os.File) {
	var hdr [recHeader]byte
	for off := int64(0); off+recHeader <= p.size; {
		if _, err := f.ReadAt(hdr[:], off); err != nil {
			return
		}
		r, err := decodeRecord(hdr[:])
		if err != nil || off+recHeader+int64(r.z) > p.size || len(p.entries) >= maxPackEntries {
			return
		}
		p.entries = append(p.entries, blobLoc{p: p, off: off + recHeader, record: r})
		off += recHeader + int64(r.z)
	}
}

func (p *packFile) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f != nil {
		p.f.Close()
		p.f = nil
	}
}

// file opens the pack for reading, with O_DIRECT where it can.
func (s *Store) packHandle(p *packFile) (*os.File, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f != nil {
		return p.f, p.direct, nil
	}
	if !s.direct.refused.Load() {
		f, err := s.r.open(p.rel(), unix.O_RDONLY|unix.O_DIRECT, 0)
		if err == nil {
			p.f, p.direct = f, true
			return f, true, nil
		}
		if !errors.Is(err, unix.EINVAL) {
			return nil, false, err
		}
	}
	f, err := s.r.open(p.rel(), unix.O_RDONLY, 0)
	if err != nil {
		return nil, false, err
	}
	p.f = f
	return f, false, nil
}

// readBlob calls fn with the blob at l, which it must not keep.
func (s *Store) readBlob(l blobLoc, fn func(z []byte) error) error {
	f, direct, err := s.packHandle(l.p)
	if err != nil {
		return err
	}
	if l.off+int64(l.z) > l.p.size {
		return fmt.Errorf("%s: blob at %d+%d is past the pack's end", l.p.rel(), l.off, l.z)
	}
	bp := zbufs.Get().(*[]byte)
	defer zbufs.Put(bp)
	start, end := l.off, l.off+int64(l.z)
	if direct {
		start = start &^ (directAlign - 1)
		end = (end + directAlign - 1) &^ (directAlign - 1)
	}
	need := int(end - start)
	if cap(*bp) < need {
		*bp = alignedBuf(need)
	}
	b := (*bp)[:need]
	n, err := preadFull(int(f.Fd()), b, start)
	if err != nil {
		if direct && errors.Is(err, unix.EINVAL) {
			s.direct.refused.Store(true)
			l.p.close()
			return s.readBlob(l, fn)
		}
		return fmt.Errorf("read %s at %d: %w", l.p.rel(), l.off, err)
	}
	lo := int(l.off - start)
	if n < lo+int(l.z) {
		return fmt.Errorf("%s: cut short at %d, blob at %d+%d", l.p.rel(), start+int64(n), l.off, l.z)
	}
	return fn(b[lo : lo+int(l.z)])
}

// preadFull reads len(b) bytes at off, or up to the end of the file.
func preadFull(fd int, b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		k, err := unix.Pread(fd, b[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if k == 0 {
			break
		}
		n += k
	}
	return n, nil
}

// packWriter appends records to packs of a store, one open pack at a time,
// from any number of goroutines. finish closes the open pack; the packs it
// wrote are then durable and in the store's index. Each pack file stays
// within limit (Store.PackLimit), but one whose single record alone is
// larger.
type packWriter struct {
	s     *Store
	limit int64

	mu       sync.Mutex
	cur      *openPack
	finished []*packFile
	err      error
	bytes    int64 // record bytes appended
	records  int
}

type openPack struct {
	id     string
	f      *os.File
	direct bool
	buf    []byte // bytes from file offset base on, not yet written
	bufRef *[]byte
	base   int64
	index  []byte
	count  int
	writes sync.WaitGroup
	mu     sync.Mutex
	werr   error
}

// packFlush is how many bytes a pack's buffer gathers before its whole
// blocks are written.
const packFlush = 4 << 20

var packBufs = sync.Pool{New: func() any {
	b := alignedBuf(packFlush + maxStored + 2*recHeader + directAlign)
	return &b
}}

func (s *Store) newPackWriter() *packWriter {
	limit := s.PackLimit
	if limit <= 0 {
		limit = DefaultPackLimit
	}
	return &packWriter{s: s, limit: limit}
}

func (pw *packWriter) fail(err error) {
	if pw.err == nil {
		pw.err = err
	}
}

// append adds a record with blob z and returns the blob's location.
func (pw *packWriter) append(r record, z []byte) (blobLoc, error) {
	r.z = uint32(len(z))
	r.check = fileCheckBits(z)
	pw.mu.Lock()
	if pw.err != nil {
		err := pw.err
		pw.mu.Unlock()
		return blobLoc{}, err
	}
	if pw.cur != nil && pw.cur.packSize(len(z)) > pw.limit {
		if err := pw.finishCur(); err != nil {
			pw.fail(err)
			pw.mu.Unlock()
			return blobLoc{}, err
		}
	}
	if pw.cur == nil {
		op, err := pw.open()
		if err != nil {
			pw.fail(err)
			pw.mu.Unlock()
			return blobLoc{}, err
		}
		pw.cur = op
	}
	op := pw.cur
	at := op.base + int64(len(op.buf))
	n := len(op.buf)
	op.buf = op.buf[:n+recHeader+len(z)]
	r.encode(op.buf[n:])
	copy(op.buf[n+recHeader:], z)
	var e [indexEntry]byte
	binary.LittleEndian.PutUint64(e[:], uint64(at+recHeader))
	copy(e[8:], op.buf[n:n+recHeader])
	op.index = append(op.index, e[:]...)
	op.count++
	pw.bytes += int64(recHeader + len(z))
	pw.records++
	loc := blobLoc{off: at + recHeader, record: r}
	// Whole blocks go to the disk now, by this goroutine, outside the lock.
	var w []byte
	var wAt int64
	var wbuf *[]byte
	if len(op.buf) >= packFlush {
		whole := len(op.buf) &^ (directAlign - 1)
		nb := packBufs.Get().(*[]byte)
		rest := copy((*nb)[:cap(*nb)], op.buf[whole:])
		wbuf = op.bufRef
		w, wAt = op.buf[:whole], op.base
		op.buf, op.bufRef = (*nb)[:rest], nb
		op.base += int64(whole)
		op.writes.Add(1)
	}
	pw.mu.Unlock()
	if w != nil {
		err := op.write(w, wAt)
		packBufs.Put(wbuf)
		op.writes.Done()
		if err != nil {
			op.mu.Lock()
			if op.werr == nil {
				op.werr = err
			}
			op.mu.Unlock()
		}
	}
	return loc, nil
}

// packSize is the size op's file would have, index and footer included,
// with one more record of a blob of n bytes. pw.mu is held.
func (op *openPack) packSize(n int) int64 {
	return op.base + int64(len(op.buf)) + recHeader + int64(n) +
		int64(len(op.index)) + indexEntry + footerLen
}

func (op *openPack) write(b []byte, at int64) error {
	if err := pwriteAll(int(op.f.Fd()), b, at); err != nil {
		return fmt.Errorf("write pack %s: %w", op.f.Name(), err)
	}
	return nil
}

func (pw *packWriter) open() (*openPack, error) {
	id := newPackID()
	f, err := pw.s.r.open("packs/"+id+".tmp", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, fileMode)
	if err != nil {
		return nil, fmt.Errorf("create pack: %w", err)
	}
	op := &openPack{id: id, f: f}
	if !pw.s.direct.refused.Load() {
		fd := int(f.Fd())
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_DIRECT); err == nil {
				op.direct = true
			} else {
				pw.s.direct.refused.Store(true)
			}
		}
	}
	nb := packBufs.Get().(*[]byte)
	op.buf, op.bufRef = (*nb)[:0], nb
	return op, nil
}

// finishCur writes the open pack's rest, index and footer, makes it
// durable and renames it into place. pw.mu is held.
func (pw *packWriter) finishCur() error {
	op := pw.cur
	pw.cur = nil
	if op == nil {
		return nil
	}
	op.writes.Wait()
	defer packBufs.Put(op.bufRef)
	fail := func(err error) error {
		op.f.Close()
		_ = pw.s.r.remove("packs/" + op.id + ".tmp")
		return err
	}
	if op.werr != nil {
		return fail(op.werr)
	}
	fd := int(op.f.Fd())
	if op.direct {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err == nil {
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_DIRECT)
		}
		if err != nil {
			return fail(err)
		}
	}
	indexAt := op.base + int64(len(op.buf))
	tail := append([]byte(nil), op.buf...)
	tail = append(tail, op.index...)
	var ft [footerLen]byte
	copy(ft[:8], footerMagic)
	binary.LittleEndian.PutUint32(ft[8:], uint32(op.count))
	binary.LittleEndian.PutUint64(ft[16:], uint64(indexAt))
	binary.LittleEndian.PutUint32(ft[24:], crc32.Checksum(op.index, castagnoli))
	binary.LittleEndian.PutUint32(ft[28:], crc32.Checksum(ft[:28], castagnoli))
	tail = append(tail, ft[:]...)
	if err := op.write(tail, op.base); err != nil {
		return fail(err)
	}
	if err := unix.Fdatasync(fd); err != nil {
		return fail(fmt.Errorf("fsync pack: %w", err))
	}
	if err := op.f.Close(); err != nil {
		return fail(err)
	}
	CrashPoint("pack-written")
	name := op.id + ".pack"
	if err := pw.s.r.rename("packs/"+op.id+".tmp", "packs/"+name); err != nil {
		return fail(err)
	}
	p := &packFile{name: name, size: indexAt + int64(len(op.index)) + footerLen}
	for i := 0; i < op.count; i++ {
		e := op.index[i*indexEntry:]
		r, _ := decodeRecord(e[8:])
		p.entries = append(p.entries, blobLoc{p: p, off: int64(binary.LittleEndian.Uint64(e)), record: r})
	}
	pw.finished = append(pw.finished, p)
	return nil
}

// finish closes the open pack, fsyncs packs/ and adds every pack written
// to the store's index. It returns the first error of any append.
func (pw *packWriter) finish() error {
	if pw == nil {
		return nil
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	if pw.cur != nil {
		if pw.err != nil {
			op := pw.cur
			pw.cur = nil
			op.writes.Wait()
			op.f.Close()
			_ = pw.s.r.remove("packs/" + op.id + ".tmp")
		} else if err := pw.finishCur(); err != nil {
			pw.fail(err)
		}
	}
	if pw.err != nil {
		return pw.err
	}
	if len(pw.finished) > 0 {
		if err := pw.s.r.syncDir("packs"); err != nil {
			pw.fail(err)
			return err
		}
	}
	for _, p := range pw.finished {
		pw.s.idx.add(p)
	}
	return nil
}

// abort drops the open pack (finished ones stay, unreferenced, until GC).
func (pw *packWriter) abort() {
	if pw == nil {
		return
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	pw.fail(errors.New("aborted"))
	if op := pw.cur; op != nil {
		pw.cur = nil
		op.writes.Wait()
		op.f.Close()
		_ = pw.s.r.remove("packs/" + op.id + ".tmp")
		packBufs.Put(op.bufRef)
	}
	for _, p := range pw.finished {
		pw.s.idx.add(p)
	}
}

// PackInfo describes one pack file (for inspect, and for tests that damage
// a store on purpose).
type PackInfo struct {
	Name    string       `json:"name"` // file name in packs/
	Path    string       `json:"path"`
	Size    int64        `json:"size"`
	Records []PackRecord `json:"records"`
	// Scanned says why the pack's index was rebuilt from its records
	// (its end is damaged); empty when it read.
	Scanned string `json:"scanned,omitempty"`
}

// PackRecord is one blob of a pack.
type PackRecord struct {
	Kind   string `json:"kind"` // "chunk" or "delta"
	Hash   string `json:"hash"`
	Base   string `json:"base,omitempty"` // a delta's base ("zero" for a zero chunk)
	Offset int64  `json:"offset"`         // of the record's header in the pack
	Len    int64  `json:"len"`            // of the record, header included
}

// Packs lists the store's finished packs and what each holds, by name.
func (s *Store) Packs() ([]PackInfo, error) {
	ix, err := s.index()
	if err != nil {
		return nil, err
	}
	var out []PackInfo
	for _, p := range ix.list() {
		pi := PackInfo{Name: p.name, Path: s.r.pathOf(p.rel()), Size: p.size, Scanned: p.scanned}
		for _, l := range p.entries {
			r := PackRecord{Kind: map[uint8]string{kindFull: "chunk", kindDelta: "delta"}[l.kind],
				Hash: hex.EncodeToString(l.hash[:]), Offset: l.off - recHeader, Len: recHeader + int64(l.z)}
			if l.kind == kindDelta {
				r.Base = hex.EncodeToString(l.base[:])
				if l.zeroBase {
					r.Base = "zero"
				}
			}
			pi.Records = append(pi.Records, r)
		}
		out = append(out, pi)
	}
	slices.SortFunc(out, func(a, b PackInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
