package pageserver

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// sink collects chunks per pages image.
type sink struct {
	chunks map[string][][]byte
}

func (s *sink) Buffer() []byte { return make([]byte, 0, 1<<20) }
func (s *sink) Put(img *Image, _ uint64, b []byte) error {
	s.chunks[img.Pages] = append(s.chunks[img.Pages], b)
	return nil
}

// dumpSide plays CRIU's part of the protocol, as criu/page-xfer.c does.
type dumpSide struct {
	t *testing.T
	c net.Conn
	w Wire
}

// psi writes a request header as CRIU lays it out: by hand, as the C
// struct is, so that Wire.decode is checked against it rather than itself.
func (d dumpSide) psi(cmd, nr uint32, vaddr, dst uint64) {
	b := binary.LittleEndian.AppendUint32(nil, cmd)
	if d.w.wide {
		b = binary.LittleEndian.AppendUint32(b, 0) // padding before the u64
		b = binary.LittleEndian.AppendUint64(b, uint64(nr))
	} else {
		b = binary.LittleEndian.AppendUint32(b, nr)
	}
	b = binary.LittleEndian.AppendUint64(b, vaddr)
	b = binary.LittleEndian.AppendUint64(b, dst)
	if _, err := d.c.Write(b); err != nil {
		d.t.Fatal(err)
	}
}

// wires are both header layouts, by the CRIU that speaks them.
var wires = map[string]Wire{"criu-4.1": WireFor(40101), "criu-4.2": WireFor(40201)}

func (d dumpSide) expect(n int) []byte {
	b := make([]byte, n)
	if _, err := io.ReadFull(d.c, b); err != nil {
		d.t.Fatalf("no answer from the page server: %v", err)
	}
	return b
}

func pages(seed byte, n int) []byte {
	b := make([]byte, n*PageSize)
	for i := range b {
		b[i] = seed + byte(i/PageSize)
	}
	return b
}

func TestReceiverCutsByAddressAndRebuildsPagemap(t *testing.T) {
	for name, w := range wires {
		t.Run(name, func(t *testing.T) { testReceiverCuts(t, w) })
	}
}

func testReceiverCuts(t *testing.T, w Wire) {
	a, b := net.Pipe()
	s := &sink{chunks: map[string][][]byte{}}
	r := &Receiver{Window: 4 * PageSize, Max: 4 * PageSize, Sink: s, Wire: w}
	done := make(chan error, 1)
	go func() { done <- r.Serve(b) }()

	d := dumpSide{t, a, w}
	pid := uint64(42)<<typeBits | typePID
	d.psi(cmdOpen2, 0, 0, pid)
	if got := d.expect(1); got[0] != 0 {
		t.Fatalf("OPEN2 answered has_parent=%d, want 0", got[0])
	}
	// Run 1: 6 pages from 0x10000 (crosses a window at 0x14000).
	d.psi(cmdAddF|PEPresent<<cmdBits, 6, 0x10000, pid)
	run1 := pages(1, 6)
	a.Write(run1)
	// Run 2 continues run 1 exactly: the chunk carries on.
	d.psi(cmdAddF|PEPresent<<cmdBits, 1, 0x16000, pid)
	run2 := pages(9, 1)
	a.Write(run2)
	// A lazy entry has no data; then a run far away.
	d.psi(cmdAddF|PELazy<<cmdBits, 3, 0x40000, pid)
	d.psi(cmdAddF|PEPresent<<cmdBits, 2, 0x80000, pid)
	run3 := pages(20, 2)
	a.Write(run3)
	// A shared-memory pagemap.
	shm := uint64(7)<<typeBits | typeShm
	d.psi(cmdOpen2, 0, 0, shm)
	d.expect(1)
	d.psi(cmdAdd, 1, 0x0, shm)
	a.Write(pages(30, 1))
	d.psi(cmdForceClose, 0, 0, 0)
	if st := d.expect(4); !bytes.Equal(st, []byte{0, 0, 0, 0}) {
		t.Fatalf("CLOSE answered %v, want status 0", st)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	imgs := r.Images()
	if len(imgs) != 2 || imgs[0].Pagemap != "pagemap-42.img" || imgs[1].Pagemap != "pagemap-shmem-7.img" ||
		imgs[0].Pages != "pages-1.img" || imgs[1].Pages != "pages-2.img" {
		t.Fatalf("images: %+v", imgs)
	}
	// Chunks: [0x10000,0x14000) [0x14000,0x17000) [0x80000,0x82000).
	got := s.chunks["pages-1.img"]
	want := [][]byte{run1[:4*PageSize], append(append([]byte{}, run1[4*PageSize:]...), run2...), run3}
	if len(got) != len(want) {
		t.Fatalf("%d chunks, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("chunk %d differs (len %d, want %d)", i, len(got[i]), len(want[i]))
		}
	}
	if imgs[0].Bytes != int64(9*PageSize) {
		t.Errorf("received %d bytes, want %d", imgs[0].Bytes, 9*PageSize)
	}

	// The rebuilt pagemap decodes with go-criu's crit, like CRIU's own.
	enc, err := PagemapImage(imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "pagemap-42.img")
	os.WriteFile(p, enc, 0o600)
	f, _ := os.Open(p)
	defer f.Close()
	img, err := crit.New(f, nil, "", false, false).Decode(&pagemap.PagemapEntry{})
	if err != nil {
		t.Fatalf("crit cannot decode the rebuilt pagemap: %v", err)
	}
	if img.Magic != "PAGEMAP" {
		t.Errorf("magic %q, want PAGEMAP", img.Magic)
	}
	head := img.Entries[0].Message.(*pagemap.PagemapHead)
	if head.GetPagesId() != 1 {
		t.Errorf("pages_id %d, want 1", head.GetPagesId())
	}
	var entries []Entry
	for _, e := range img.Entries[1:] {
		pe := e.Message.(*pagemap.PagemapEntry)
		entries = append(entries, Entry{pe.GetVaddr(), pe.GetNrPages(), pe.GetFlags()})
	}
	wantE := []Entry{{0x10000, 6, PEPresent}, {0x16000, 1, PEPresent}, {0x40000, 3, PELazy}, {0x80000, 2, PEPresent}}
	if len(entries) != len(wantE) {
		t.Fatalf("entries %v, want %v", entries, wantE)
	}
	for i := range wantE {
		if entries[i] != wantE[i] {
			t.Errorf("entry %d = %+v, want %+v", i, entries[i], wantE[i])
		}
	}
}

func TestReceiverRefusesTruncatedStream(t *testing.T) {
	a, b := net.Pipe()
	r := &Receiver{Window: 4 * PageSize, Max: 4 * PageSize, Sink: &sink{chunks: map[string][][]byte{}}}
	done := make(chan error, 1)
	go func() { done <- r.Serve(b) }()
	d := dumpSide{t, a, Wire{}}
	pid := uint64(1)<<typeBits | typePID
	d.psi(cmdOpen2, 0, 0, pid)
	d.expect(1)
	d.psi(cmdAddF|PEPresent<<cmdBits, 2, 0x1000, pid)
	a.Write(pages(1, 1)) // one page of two, then CRIU dies
	a.Close()
	if err := <-done; err == nil {
		t.Fatal("a stream cut mid-pages was accepted")
	}
}

func TestReceiverRefusesUnknownCommand(t *testing.T) {
	a, b := net.Pipe()
	r := &Receiver{Window: PageSize, Max: PageSize, Sink: &sink{chunks: map[string][][]byte{}}}
	done := make(chan error, 1)
	go func() { done <- r.Serve(b) }()
	dumpSide{t, a, Wire{}}.psi(0x99, 0, 0, 0)
	if err := <-done; err == nil {
		t.Fatal("unknown command accepted")
	}
}

// TestEntryPages reads a pagemap entry's page count as CRIU 4.2 writes it
// (uint64 field 5, with 0 in the old field 2) and as older CRIU and cryo
// write it (field 2 only).
func TestEntryPages(t *testing.T) {
	old := &pagemap.PagemapEntry{Vaddr: proto.Uint64(0x1000), NrPages: proto.Uint32(7)}
	if got := EntryPages(old); got != 7 {
		t.Errorf("field 2 only: %d pages, want 7", got)
	}
	b, err := proto.Marshal(&pagemap.PagemapEntry{Vaddr: proto.Uint64(0x1000), NrPages: proto.Uint32(0), Flags: proto.Uint32(PEPresent)})
	if err != nil {
		t.Fatal(err)
	}
	b = protowire.AppendTag(b, 5, protowire.VarintType)
	b = protowire.AppendVarint(b, 1<<33)
	var v42 pagemap.PagemapEntry
	if err := proto.Unmarshal(b, &v42); err != nil {
		t.Fatal(err)
	}
	if got := EntryPages(&v42); got != 1<<33 {
		t.Errorf("field 5: %d pages, want %d", got, uint64(1)<<33)
	}
}
