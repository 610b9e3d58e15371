package store

// Page-level increments. A chunk of a later generation that differs from
// the previous version at its place (the same address in the same pages
// image, or the same offset in another image) in at most half of its
// pages is stored as a delta: a bitmap of the pages that differ from a
// base, and those pages, compressed. The base is always a full chunk
// (the previous version itself, or the previous version's base) or a zero
// chunk, never another delta, so a chunk is read from at most two blobs:
//
//	K = 2 objects per chunk (its delta and its base)
//
// A delta holds every page that differs from its base, not only those
// changed since the previous generation, so it grows as the job writes
// more of the chunk; past half of the pages the chunk is stored whole
// again and becomes the base of the next ones. A chunk that is unchanged
// is found by its name and costs nothing more; one that changed is
// compared with its base, read back from the store, page by page. Where
// the kernel tracks written pages (soft-dirty, see DirtyTracking) CRIU
// could send only those; these kernels lack it, and the comparison is what
// decides, which needs no digest of any page to be trusted.

import (
	"errors"
	"fmt"
)

// encodeDelta returns the delta payload of b against a base, for the
// pages listed (ascending).
func encodeDelta(dst, b []byte, pages []int) []byte {
	np := pagesOf(len(b))
	bm := (np + 7) / 8
	dst = append(dst[:0], make([]byte, bm)...)
	for _, p := range pages {
		dst[p/8] |= 1 << (p % 8)
	}
	for _, p := range pages {
		dst = append(dst, b[p*PageSize:min((p+1)*PageSize, len(b))]...)
	}
	return dst
}

// applyDelta writes the pages of payload over out (the base's content, n
// bytes).
func applyDelta(out, payload []byte) error {
	n := len(out)
	np := pagesOf(n)
	bm := (np + 7) / 8
	if len(payload) < bm {
		return errors.New("delta shorter than its page bitmap")
	}
	at := bm
	for p := range np {
		if payload[p/8]&(1<<(p%8)) == 0 {
			continue
		}
		lo, hi := p*PageSize, min((p+1)*PageSize, n)
		if at+hi-lo > len(payload) {
			return errors.New("delta holds fewer pages than its bitmap lists")
		}
		copy(out[lo:hi], payload[at:at+hi-lo])
		at += hi - lo
	}
	if at != len(payload) {
		return fmt.Errorf("delta holds %d bytes more than its bitmap lists", len(payload)-at)
	}
	return nil
}

// DirtyTracking says how the kernel can tell which pages a process wrote
// since a point: "soft-dirty" (/proc/PID/clear_refs and the pagemap's bit
// 55), or "" when it cannot; either way this cryo finds the changed pages
// of a changed chunk by comparing it with its base (the kernel's bits
// would only spare naming unchanged chunks). PAGEMAP_SCAN's written bit
// needs the pages registered with userfaultfd write-protection inside the
// job, which only CRIU's parasite could do; it is not probed.
func DirtyTracking() string {
	if softDirty() {
		return "soft-dirty"
	}
	return ""
}
