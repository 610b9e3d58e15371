package pageserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// PageSource answers a lazy-pages request: up to nr pages of process pid
// from address vaddr. It returns the pages it has (a whole number of
// pages, at most nr); none means the range is unknown.
type PageSource func(pid int, vaddr uint64, nr uint32) ([]byte, error)

// ServeLazy is the sending end of the protocol for a restore with lazy
// pages: CRIU's lazy-pages daemon asks for pages (PS_IOV_GET) as the
// restored job touches them, and in the background for all the rest, and
// says when it is done (PS_IOV_CLOSE). It returns the bytes sent.
func ServeLazy(c io.ReadWriter, src PageSource) (int64, error) {
	var hdr [24]byte
	var sent int64
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return sent, nil // the daemon went away after its last page
			}
			return sent, fmt.Errorf("pageserver: read request: %w", err)
		}
		cmd := binary.LittleEndian.Uint32(hdr[0:]) & (1<<cmdBits - 1)
		nr := binary.LittleEndian.Uint32(hdr[4:])
		vaddr := binary.LittleEndian.Uint64(hdr[8:])
		dst := binary.LittleEndian.Uint64(hdr[16:])
		switch cmd {
		case cmdGet:
			pages, err := src(int(dst), vaddr, nr)
			if err != nil {
				return sent, fmt.Errorf("pageserver: pages of pid %d at %#x: %w", dst, vaddr, err)
			}
			n := uint32(len(pages) / PageSize)
			var out [24]byte
			binary.LittleEndian.PutUint32(out[0:], cmdAddF|PEPresent<<cmdBits)
			binary.LittleEndian.PutUint32(out[4:], n)
			binary.LittleEndian.PutUint64(out[8:], vaddr)
			binary.LittleEndian.PutUint64(out[16:], dst)
			if _, err := c.Write(out[:]); err != nil {
				return sent, err
			}
			if _, err := c.Write(pages[:int(n)*PageSize]); err != nil {
				return sent, err
			}
			sent += int64(n) * PageSize
		case cmdClose, cmdForceClose:
			var ok [4]byte
			_, err := c.Write(ok[:])
			return sent, err
		default:
			return sent, fmt.Errorf("pageserver: unexpected command %#x from the lazy-pages daemon", cmd)
		}
	}
}
