package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"

	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
)

// A streamed restore leaves out memory that is zero. The store knows it
// without reading it (zero chunks are not stored), and a private anonymous
// mapping that CRIU restores starts out zero, so those pages need neither
// reading, copying nor touching: the job gets them from the kernel when it
// first uses them, as a fresh process would. Each process's pagemap is
// rewritten without the zero chunks that lie wholly in such mappings, and
// its pages image is sent without them. (Where a child shares a mapping
// with its parent, CRIU zaps the pages the child's pagemap does not list,
// so they read as zero there too.)

// Status bits of mappings CRIU restores by other means than fresh
// anonymous memory plus pages (criu/include/image.h): their zero pages are
// sent as they are.
const (
	vmaAnonPrivate = 1 << 9
	vmaSpecial     = 1<<10 | 1<<11 | 1<<13 | 1<<14 | 1<<27 | 1<<31 // SysV IPC, socket, AIO ring, memfd, plugin, unsupported
)

// startsZero reports whether CRIU restores a mapping as fresh private
// anonymous memory, which reads as zero wherever no page is written.
func startsZero(flags, status uint32) bool {
	return canBeLazy(flags, status) && status&vmaAnonPrivate != 0 && status&vmaSpecial == 0
}

// zeroSkip is the plan for one generation: rewritten pagemaps by name, and
// by pages image the chunks not to send.
type zeroSkip struct {
	pagemaps map[string][]byte
	skip     map[string]map[int]bool
	bytes    int64 // memory left out
}

func planZeroSkip(st *store.Store, m *store.Manifest) (*zeroSkip, error) {
	z := &zeroSkip{pagemaps: map[string][]byte{}, skip: map[string]map[int]bool{}}
	files := map[string]*store.File{}
	for i := range m.Files {
		files[m.Files[i].Name] = &m.Files[i]
	}
	for _, f := range m.Files {
		mt := pidPagemapRE.FindStringSubmatch(f.Name)
		if mt == nil {
			continue
		}
		pid, _ := strconv.Atoi(mt[1])
		if err := z.plan(st, m, files, f.Name, pid); err != nil {
			return nil, fmt.Errorf("%s: %w", f.Name, err)
		}
	}
	return z, nil
}

func (z *zeroSkip) plan(st *store.Store, m *store.Manifest, files map[string]*store.File, name string, pid int) error {
	// The pagemap is read as a stream, and its entries are bounded by what
	// the pages image can hold: a manifest's sizes are claims, and a crafted
	// one must not make a restore allocate by them.
	r, err := st.OpenFile(m, name)
	if err != nil {
		return err
	}
	var entries []pageserver.Entry
	var nPresent int64
	pagesID, err := pageserver.ReadPagemap(r, func(id uint32, e pageserver.Entry) error {
		// Every present entry holds a page of the pages image; the others
		// (holes, lazy) are as many at most as there are mappings.
		if e.Flags&pageserver.PEPresent != 0 {
			nPresent++
			if pf := files[fmt.Sprintf("pages-%d.img", id)]; pf == nil || nPresent > pf.Size/pageserver.PageSize {
				return fmt.Errorf("more present pagemap entries than pages-%d.img has pages", id)
			}
		} else if int64(len(entries))-nPresent > 1<<17 {
			return errors.New("more pagemap entries than a process has mappings")
		}
		entries = append(entries, e)
		return nil
	})
	if err != nil {
		return err
	}
	pf := files[fmt.Sprintf("pages-%d.img", pagesID)]
	mmf := files[fmt.Sprintf("mm-%d.img", pid)]
	if pf == nil || mmf == nil {
		return nil // nothing to plan with; sent as stored
	}
	if mmf.Size > pageserver.MaxMessage+8 {
		return fmt.Errorf("%s is %d bytes, more than a process's mappings take", mmf.Name, mmf.Size)
	}
	mb, err := st.ReadAt(m, mmf.Name, 0, mmf.Size)
	if err != nil {
		return err
	}
	vmas, err := parseVMAs(mb, startsZero)
	if err != nil {
		return fmt.Errorf("%s: %w", mmf.Name, err)
	}

	// Where each present entry's pages sit in the pages image.
	type placed struct {
		e   pageserver.Entry
		off int64
	}
	var present []placed
	var off int64
	for _, e := range entries {
		if e.Flags&pageserver.PEPresent != 0 {
			present = append(present, placed{e, off})
			off += int64(e.NrPages) * pageserver.PageSize
		}
	}
	if off != pf.Size {
		return fmt.Errorf("pagemap lists %d bytes of pages, %s holds %d", off, pf.Name, pf.Size)
	}
	// A zero chunk is left out when all of it lies in private anonymous
	// mappings; what is left out is noted by address.
	type span struct{ start, end uint64 }
	var dropped []span
	skip := map[int]bool{}
	var cs int64
	for ci, c := range pf.Chunks {
		ce := cs + c.Len
		if c.Zero && c.Len > 0 && cs%pageserver.PageSize == 0 && c.Len%pageserver.PageSize == 0 {
			i := sort.Search(len(present), func(i int) bool {
				return present[i].off+int64(present[i].e.NrPages)*pageserver.PageSize > cs
			})
			var pieces []span
			ok := true
			for p := cs; p < ce && ok; i++ {
				if i >= len(present) {
					ok = false
					break
				}
				pe := present[i]
				pend := pe.off + int64(pe.e.NrPages)*pageserver.PageSize
				lo, hi := p, min(ce, pend)
				a := pe.e.Vaddr + uint64(lo-pe.off)
				bEnd := pe.e.Vaddr + uint64(hi-pe.off)
				lazy, next := lazyAt(vmas, a, bEnd)
				if !lazy || next < bEnd {
					ok = false
				}
				pieces = append(pieces, span{a, bEnd})
				p = hi
			}
			if ok {
				skip[ci] = true
				dropped = append(dropped, pieces...)
				z.bytes += c.Len
			}
		}
		cs = ce
	}
	if len(skip) == 0 {
		return nil
	}
	// The new pagemap: every entry as it was, less the dropped spans
	// (which are in address order, as the pages image is).
	img := &pageserver.Image{PagesID: pagesID}
	d := 0
	for _, e := range entries {
		if e.Flags&pageserver.PEPresent == 0 {
			img.Entries = append(img.Entries, e)
			continue
		}
		a, end := e.Vaddr, e.Vaddr+uint64(e.NrPages)*pageserver.PageSize
		for d < len(dropped) && dropped[d].end <= a {
			d++
		}
		for a < end {
			if d < len(dropped) && dropped[d].start < end {
				if dropped[d].start > a {
					img.Entries = append(img.Entries, pageserver.Entry{Vaddr: a, NrPages: uint32((dropped[d].start - a) / pageserver.PageSize), Flags: e.Flags})
				}
				a = min(dropped[d].end, end)
				if dropped[d].end <= end {
					d++
				}
				continue
			}
			img.Entries = append(img.Entries, pageserver.Entry{Vaddr: a, NrPages: uint32((end - a) / pageserver.PageSize), Flags: e.Flags})
			a = end
		}
	}
	nb, err := pageserver.PagemapImage(img)
	if err != nil {
		return err
	}
	z.pagemaps[name] = nb
	z.skip[pf.Name] = skip
	return nil
}

// skippingSource is the generation's store.Source with the plan applied.
type skippingSource struct {
	src *store.Source
	z   *zeroSkip
}

func (s skippingSource) Has(name string) bool { return s.src.Has(name) }

func (s skippingSource) Send(ctx context.Context, name string, w io.Writer) error {
	if b, ok := s.z.pagemaps[name]; ok {
		_, err := w.Write(b)
		return err
	}
	return s.src.SendSkipping(ctx, name, w, s.z.skip[name])
}
