package pageserver

import (
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
//
// w is the header layout of the CRIU at the other end (WireFor).
func ServeLazy(c io.ReadWriter, w Wire, src PageSource) (int64, error) {
	hdr := make([]byte, w.size())
	var sent int64
	for {
		if _, err := io.ReadFull(c, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return sent, nil // the daemon went away after its last page
			}
			return sent, fmt.Errorf("pageserver: read request: %w", err)
		}
		pi, err := w.decode(hdr)
		if err != nil {
			return sent, err
		}
		cmd, nr, vaddr, dst := pi.cmd&(1<<cmdBits-1), pi.nrPages, pi.vaddr, pi.dstID
		switch cmd {
		case cmdGet:
			pages, err := src(int(dst), vaddr, nr)
			if err != nil {
				return sent, fmt.Errorf("pageserver: pages of pid %d at %#x: %w", dst, vaddr, err)
			}
			n := uint32(len(pages) / PageSize)
			out := w.encode(nil, iov{cmd: cmdAddF | PEPresent<<cmdBits, nrPages: n, vaddr: vaddr, dstID: dst})
			if _, err := c.Write(out); err != nil {
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
