// Package pageserver is the receiving end of CRIU's page-server protocol
// (criu/page-xfer.c), so that a dump streams memory pages straight into
// cryo instead of writing pages-*.img: each run of pages arrives with its
// virtual address, is cut into address-aligned chunks and handed on for
// hashing and compression while CRIU is still dumping. The pagemap images
// that CRIU would have written are rebuilt from what arrived (PagemapImage),
// so the stored generation restores with a plain CRIU restore.
//
// It knows the wire format and the image format of pagemaps, nothing of the
// store.
package pageserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"google.golang.org/protobuf/encoding/protowire"
	"io"
	"math"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"google.golang.org/protobuf/proto"
)

// Commands of the protocol (criu/page-xfer.c).
const (
	cmdAdd        = 1
	cmdHole       = 2
	cmdOpen       = 3
	cmdOpen2      = 4
	cmdParent     = 5
	cmdAddF       = 6
	cmdGet        = 7
	cmdClose      = 0x1023
	cmdForceClose = 0x1024

	cmdBits  = 16
	typeBits = 8
	typePID  = 1
	typeShm  = 2
)

// Pagemap entry flags.
const (
	PEParent  = 1 << 0
	PELazy    = 1 << 1
	PEPresent = 1 << 2
)

// Image magics (criu/include/magic.h).
const (
	imgCommonMagic = 0x54564319
	pagemapMagic   = 0x56084025
)

// PageSize is the size of a page on the wire.
const PageSize = 4096

// Entry is one pagemap entry: a run of pages at an address.
type Entry struct {
	Vaddr   uint64
	NrPages uint32
	Flags   uint32
}

// Image is one pagemap and its pages as they arrived.
type Image struct {
	Pagemap string // "pagemap-<pid>.img" or "pagemap-shmem-<id>.img"
	Pages   string // "pages-<id>.img"
	PagesID uint32
	Entries []Entry
	Bytes   int64 // page bytes received
}

// Sink takes the pages of one image as chunks, in order, each with the
// virtual address of its first byte. Buffer returns an empty buffer of at
// least max bytes' capacity; Put takes it over.
type Sink interface {
	Buffer() []byte
	Put(img *Image, addr uint64, data []byte) error
}

// Receiver serves one dump's connection.
type Receiver struct {
	// Window is the address window chunks may not cross (a power of two).
	Window uint64
	// Max is the largest chunk.
	Max  int
	Sink Sink
	// Wire is the header layout of the CRIU that dumps (WireFor).
	Wire Wire

	images  []*Image
	nextID  uint32
	cur     *Image
	buf     []byte // the chunk being filled
	bufAddr uint64 // address of buf's first byte
}

// Images returns what was received, in the order the dump opened them.
func (r *Receiver) Images() []*Image { return r.images }

type iov struct {
	cmd     uint32
	nrPages uint32
	vaddr   uint64
	dstID   uint64
}

// Wire is the layout of the protocol's request header, which depends on
// the CRIU at the other end: {u32 cmd; u32 nr_pages; u64 vaddr; u64 dst}
// (24 bytes) before CRIU 4.2, and with a u64 nr_pages after 4 bytes of
// padding (32 bytes) since. The zero value is the older layout.
type Wire struct{ wide bool }

// WireFor returns the layout spoken by CRIU of version v (major*10000 +
// minor*100 + sublevel, as criu.Binary.Version).
func WireFor(v int) Wire { return Wire{wide: v >= 40200} }

func (w Wire) size() int {
	if w.wide {
		return 32
	}
	return 24
}

// decode reads a header of w.size() bytes. A page count that does not fit
// in 32 bits is refused: no one mapping sent to cryo is that large.
func (w Wire) decode(b []byte) (iov, error) {
	if !w.wide {
		return iov{cmd: binary.LittleEndian.Uint32(b[0:]), nrPages: binary.LittleEndian.Uint32(b[4:]),
			vaddr: binary.LittleEndian.Uint64(b[8:]), dstID: binary.LittleEndian.Uint64(b[16:])}, nil
	}
	n := binary.LittleEndian.Uint64(b[8:])
	if n > math.MaxUint32 {
		return iov{}, fmt.Errorf("pageserver: a request for %d pages", n)
	}
	return iov{cmd: binary.LittleEndian.Uint32(b[0:]), nrPages: uint32(n),
		vaddr: binary.LittleEndian.Uint64(b[16:]), dstID: binary.LittleEndian.Uint64(b[24:])}, nil
}

// encode appends pi's header to b.
func (w Wire) encode(b []byte, pi iov) []byte {
	b = binary.LittleEndian.AppendUint32(b, pi.cmd)
	if w.wide {
		b = binary.LittleEndian.AppendUint32(b, 0)
		b = binary.LittleEndian.AppendUint64(b, uint64(pi.nrPages))
	} else {
		b = binary.LittleEndian.AppendUint32(b, pi.nrPages)
	}
	b = binary.LittleEndian.AppendUint64(b, pi.vaddr)
	return binary.LittleEndian.AppendUint64(b, pi.dstID)
}

// Serve reads the dump's requests from c until it closes the stream, and
// answers them. It returns nil when CRIU said the transfer is complete.
func (r *Receiver) Serve(c io.ReadWriter) error {
	if r.Window == 0 || r.Max == 0 || r.Sink == nil {
		return errors.New("pageserver: receiver not configured")
	}
	hdr := make([]byte, r.Wire.size())
	for {
		if _, err := io.ReadFull(c, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("pageserver: CRIU closed the stream without finishing it")
			}
			return fmt.Errorf("pageserver: read request: %w", err)
		}
		pi, err := r.Wire.decode(hdr)
		if err != nil {
			return err
		}
		cmd, flags := pi.cmd&(1<<cmdBits-1), pi.cmd>>cmdBits
		switch cmd {
		case cmdOpen, cmdOpen2:
			if err := r.open(pi.dstID); err != nil {
				return err
			}
			if cmd == cmdOpen2 {
				if _, err := c.Write([]byte{0}); err != nil { // no parent images
					return err
				}
			}
		case cmdParent:
			var no [4]byte // int32 0: no parent
			if _, err := c.Write(no[:]); err != nil {
				return err
			}
		case cmdAdd, cmdAddF, cmdHole:
			switch cmd {
			case cmdAdd:
				flags = PEPresent
			case cmdHole:
				flags = PEParent
			}
			if err := r.add(c, pi, flags); err != nil {
				return err
			}
		case cmdClose, cmdForceClose:
			if err := r.flush(); err != nil {
				return err
			}
			var ok [4]byte // int32 0: all received
			if _, err := c.Write(ok[:]); err != nil {
				return err
			}
			return nil
		case cmdGet:
			return errors.New("pageserver: lazy page requests are not served by a dump receiver")
		default:
			return fmt.Errorf("pageserver: unknown command %#x", pi.cmd)
		}
	}
}

func (r *Receiver) open(dst uint64) error {
	if err := r.flush(); err != nil {
		return err
	}
	id := dst >> typeBits
	var name string
	switch dst & (1<<typeBits - 1) {
	case typePID:
		name = fmt.Sprintf("pagemap-%d.img", id)
	case typeShm:
		name = fmt.Sprintf("pagemap-shmem-%d.img", id)
	default:
		return fmt.Errorf("pageserver: unknown pagemap type in %#x", dst)
	}
	for _, img := range r.images {
		if img.Pagemap == name {
			r.cur = img
			return nil
		}
	}
	r.nextID++
	img := &Image{Pagemap: name, PagesID: r.nextID, Pages: fmt.Sprintf("pages-%d.img", r.nextID)}
	r.images = append(r.images, img)
	r.cur = img
	return nil
}

func (r *Receiver) add(c io.Reader, pi iov, flags uint32) error {
	if r.cur == nil {
		// Old CRIUs send pages without OPEN; the dst_id says where.
		if err := r.open(pi.dstID); err != nil {
			return err
		}
	}
	img := r.cur
	img.Entries = append(img.Entries, Entry{Vaddr: pi.vaddr, NrPages: pi.nrPages, Flags: flags})
	if flags&PEPresent == 0 {
		return nil
	}
	addr := pi.vaddr
	left := uint64(pi.nrPages) * PageSize
	for left > 0 {
		// A chunk ends where the address jumps, where a window begins, or
		// when it is full.
		if r.buf != nil && (addr != r.bufAddr+uint64(len(r.buf)) || addr%r.Window == 0 || len(r.buf) >= r.Max) {
			if err := r.flush(); err != nil {
				return err
			}
		}
		if r.buf == nil {
			r.buf = r.Sink.Buffer()
			r.bufAddr = addr
		}
		room := min(uint64(r.Max-len(r.buf)), r.Window-addr%r.Window, left)
		n := len(r.buf)
		r.buf = r.buf[:n+int(room)]
		if _, err := io.ReadFull(c, r.buf[n:]); err != nil {
			return fmt.Errorf("pageserver: read pages at %#x: %w", addr, err)
		}
		img.Bytes += int64(room)
		addr += room
		left -= room
	}
	return nil
}

func (r *Receiver) flush() error {
	if r.buf == nil {
		return nil
	}
	b := r.buf
	r.buf = nil
	return r.Sink.Put(r.cur, r.bufAddr, b)
}

// PagemapImage encodes img's pagemap the way CRIU writes pagemap-*.img:
// the common and pagemap magics, then length-prefixed protobuf entries, a
// PagemapHead naming the pages image first.
func PagemapImage(img *Image) ([]byte, error) {
	out := binary.LittleEndian.AppendUint32(nil, imgCommonMagic)
	out = binary.LittleEndian.AppendUint32(out, pagemapMagic)
	add := func(m proto.Message) error {
		b, err := proto.Marshal(m)
		if err != nil {
			return err
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(len(b)))
		out = append(out, b...)
		return nil
	}
	if err := add(&pagemap.PagemapHead{PagesId: proto.Uint32(img.PagesID)}); err != nil {
		return nil, err
	}
	for _, e := range img.Entries {
		if err := add(&pagemap.PagemapEntry{Vaddr: proto.Uint64(e.Vaddr), NrPages: proto.Uint32(e.NrPages), Flags: proto.Uint32(e.Flags)}); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// IsShmemPagemap tells whether an image name is a shared-memory pagemap.
func IsShmemPagemap(name string) bool {
	return len(name) > len("pagemap-shmem-") && name[:len("pagemap-shmem-")] == "pagemap-shmem-"
}

// ParsePagemap decodes a pagemap image (PagemapImage's format, or CRIU's):
// the pages image id and the entries, with CRIU's old in_parent encoding
// turned into flags.
func ParsePagemap(b []byte) (pagesID uint32, entries []Entry, err error) {
	msgs, err := ImageEntries(b, pagemapMagic)
	if err != nil {
		return 0, nil, err
	}
	if len(msgs) == 0 {
		return 0, nil, errors.New("pagemap image without a head")
	}
	var head pagemap.PagemapHead
	if err := proto.Unmarshal(msgs[0], &head); err != nil {
		return 0, nil, fmt.Errorf("pagemap head: %w", err)
	}
	for _, m := range msgs[1:] {
		var pe pagemap.PagemapEntry
		if err := proto.Unmarshal(m, &pe); err != nil {
			return 0, nil, fmt.Errorf("pagemap entry: %w", err)
		}
		flags := pe.GetFlags()
		if pe.Flags == nil {
			flags = PEPresent
			if pe.GetInParent() {
				flags = PEParent
			}
		}
		pages := EntryPages(&pe)
		if pages > math.MaxUint32 {
			return 0, nil, fmt.Errorf("pagemap entry at %#x: %d pages", pe.GetVaddr(), pages)
		}
		entries = append(entries, Entry{Vaddr: pe.GetVaddr(), NrPages: uint32(pages), Flags: flags})
	}
	return head.GetPagesId(), entries, nil
}

// MaxMessage bounds one message of an image read by ReadImage: a pagemap
// entry is a few bytes, an mm entry holds every mapping of a process (at
// most vm.max_map_count, 65530 by default, of about 100 bytes).
const MaxMessage = 16 << 20

// ReadImage reads a CRIU image with the common magic and the given type
// magic from r, calling fn with each length-prefixed message in turn
// (which fn must not keep): an image is never held whole, and no message
// longer than MaxMessage is allocated for.
func ReadImage(r io.Reader, magic uint32, fn func(msg []byte) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var hdr [8]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil || binary.LittleEndian.Uint32(hdr[:]) != imgCommonMagic || binary.LittleEndian.Uint32(hdr[4:]) != magic {
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
			return err
		}
		return fmt.Errorf("not an image of magic %#x", magic)
	}
	var buf []byte
	for {
		var l [4]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return errors.New("image cut short")
			}
			return err
		}
		n := binary.LittleEndian.Uint32(l[:])
		if n > MaxMessage {
			return fmt.Errorf("image message of %d bytes, more than %d", n, MaxMessage)
		}
		if cap(buf) < int(n) {
			buf = make([]byte, n, max(int(n), 2*cap(buf)))
		}
		buf = buf[:n]
		if _, err := io.ReadFull(br, buf); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return errors.New("image cut short")
			}
			return err
		}
		if err := fn(buf); err != nil {
			return err
		}
	}
}

// ReadPagemap is ParsePagemap reading from r: each entry in turn to fn,
// with the pages image id from the head; it returns that id.
func ReadPagemap(r io.Reader, fn func(pagesID uint32, e Entry) error) (uint32, error) {
	var pagesID uint32
	head := true
	err := ReadImage(r, pagemapMagic, func(msg []byte) error {
		if head {
			head = false
			var h pagemap.PagemapHead
			if err := proto.Unmarshal(msg, &h); err != nil {
				return fmt.Errorf("pagemap head: %w", err)
			}
			pagesID = h.GetPagesId()
			return nil
		}
		var pe pagemap.PagemapEntry
		if err := proto.Unmarshal(msg, &pe); err != nil {
			return fmt.Errorf("pagemap entry: %w", err)
		}
		flags := pe.GetFlags()
		if pe.Flags == nil {
			flags = PEPresent
			if pe.GetInParent() {
				flags = PEParent
			}
		}
		return fn(pagesID, Entry{Vaddr: pe.GetVaddr(), NrPages: pe.GetNrPages(), Flags: flags})
	})
	if err == nil && head {
		err = errors.New("pagemap image without a head")
	}
	return pagesID, err
}

// ImageEntries splits a CRIU image with the common magic and the given
// type magic into its length-prefixed protobuf messages.
func ImageEntries(b []byte, magic uint32) ([][]byte, error) {
	if len(b) < 8 || binary.LittleEndian.Uint32(b) != imgCommonMagic || binary.LittleEndian.Uint32(b[4:]) != magic {
		return nil, fmt.Errorf("not an image of magic %#x", magic)
	}
	b = b[8:]
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 4 {
			return nil, errors.New("image cut short")
		}
		n := binary.LittleEndian.Uint32(b)
		if uint64(n) > uint64(len(b)-4) {
			return nil, errors.New("image cut short")
		}
		out = append(out, b[4:4+n])
		b = b[4+n:]
	}
	return out, nil
}

// pagemapNrPagesField is where CRIU >= 4.2 keeps a pagemap entry's page
// count (uint64 nr_pages = 5), leaving 0 in the old required field 2
// (compat_nr_pages), the one go-criu v7's generated type knows as NrPages.
const pagemapNrPagesField = 5

// EntryPages is the number of pages a CRIU pagemap entry covers, whichever
// CRIU wrote it: field 5 when present (read from the fields go-criu does not
// know), else the old field 2. cryo writes field 2, which CRIU 4.2 falls back
// to when field 5 is absent.
func EntryPages(pe *pagemap.PagemapEntry) uint64 {
	b := pe.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			break
		}
		b = b[n:]
		if num == pagemapNrPagesField && typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				break
			}
			return v
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			break
		}
		b = b[m:]
	}
	return uint64(pe.GetNrPages())
}
