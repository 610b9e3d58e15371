package pageserver

import (
	"bytes"
	"encoding/binary"
	"io"
	"testing"
)

// FuzzParsePagemap: any bytes are refused or give entries that encode and
// parse back to the same entries.
func FuzzParsePagemap(f *testing.F) {
	b, err := PagemapImage(&Image{PagesID: 7, Entries: []Entry{{Vaddr: 0x400000, NrPages: 3, Flags: PEPresent}, {Vaddr: 0x7f0000000000, NrPages: 1, Flags: PELazy}}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:len(b)-3])
	f.Add(b[:8])
	f.Fuzz(func(t *testing.T, b []byte) {
		id, entries, err := ParsePagemap(b)
		if err != nil {
			return
		}
		again, err := PagemapImage(&Image{PagesID: id, Entries: entries})
		if err != nil {
			t.Fatal(err)
		}
		id2, entries2, err := ParsePagemap(again)
		if err != nil || id2 != id || len(entries2) != len(entries) {
			t.Fatalf("round trip: %v, id %d/%d, %d/%d entries", err, id, id2, len(entries), len(entries2))
		}
		for i := range entries {
			if entries[i] != entries2[i] {
				t.Fatalf("entry %d: %+v became %+v", i, entries[i], entries2[i])
			}
		}
	})
}

type discardSink struct{ n int }

func (s *discardSink) Buffer() []byte { return make([]byte, 0, 64<<10) }
func (s *discardSink) Put(img *Image, _ uint64, data []byte) error {
	s.n += len(data)
	return nil
}

type script struct {
	io.Reader
	io.Writer
}

func req(cmd, nr uint32, vaddr, dst uint64) []byte {
	b := binary.LittleEndian.AppendUint32(nil, cmd)
	b = binary.LittleEndian.AppendUint32(b, nr)
	b = binary.LittleEndian.AppendUint64(b, vaddr)
	return binary.LittleEndian.AppendUint64(b, dst)
}

// FuzzReceiver: whatever a peer sends on the page stream, the receiver
// ends with an error or a complete transfer, never takes more pages than
// were sent, and never panics.
func FuzzReceiver(f *testing.F) {
	ok := bytes.Join([][]byte{
		req(cmdOpen2, 0, 0, 5<<typeBits|typePID),
		req(cmdAddF|PEPresent<<cmdBits, 2, 0x10000, 0), make([]byte, 2*PageSize),
		req(cmdHole, 1, 0x20000, 0),
		req(cmdClose, 0, 0, 0),
	}, nil)
	f.Add(ok)
	f.Add(ok[:40])
	f.Add(req(cmdAddF|PEPresent<<cmdBits, 0xffffffff, 0xfffffffffffff000, 1))
	f.Fuzz(func(t *testing.T, in []byte) {
		sink := &discardSink{}
		r := &Receiver{Window: 64 << 10, Max: 64 << 10, Sink: sink}
		err := r.Serve(script{bytes.NewReader(in), io.Discard})
		if sink.n > len(in) {
			t.Fatalf("took %d bytes of pages from %d bytes of input", sink.n, len(in))
		}
		if err == nil && !bytes.Contains(in, binary.LittleEndian.AppendUint32(nil, cmdClose)) {
			t.Fatal("a transfer without PS_CLOSE was taken as complete")
		}
	})
}
