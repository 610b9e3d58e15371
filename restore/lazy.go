package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/mm"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
	"google.golang.org/protobuf/proto"
)

// A lazy restore starts the job before its memory is back. The pages of
// private anonymous mappings (the bulk of an HPC job's memory) are left
// out of the images CRIU restores from and marked lazy; CRIU registers
// those mappings with userfaultfd and its lazy-pages daemon fetches each
// page from cryo's page server when the job first touches it, and all the
// others in the background, until the job's memory is whole. Every other
// image, and the pages of other mappings, are materialized and verified
// first as in a full restore; lazy pages are verified as they are served.

// VMA flags and status bits (criu/include/image.h, linux mman.h) that
// decide whether CRIU can restore a mapping lazily (vma_entry_can_be_lazy).
const (
	mapPrivate   = 0x02
	mapAnonymous = 0x20
	mapLocked    = 0x2000
	mapHugeTLB   = 0x40000

	vmaVsyscall = 1 << 2
	vmaVDSO     = 1 << 3
	vmaVVAR     = 1 << 12
)

type vmaRange struct {
	start, end uint64
	lazy       bool
}

func canBeLazy(flags, status uint32) bool {
	return flags&mapAnonymous != 0 && flags&mapPrivate != 0 && flags&(mapLocked|mapHugeTLB) == 0 &&
		status&(vmaVDSO|vmaVVAR|vmaVsyscall) == 0
}

// pageRun is a run of pages as the stored generation holds them.
type pageRun struct {
	vaddr uint64
	off   int64 // offset in the stored pages image
	pages uint64
}

// lazySource serves the pages of one generation by process and address,
// from the store, verifying each chunk as it reads it.
type lazySource struct {
	st   *store.Store
	m    *store.Manifest
	runs map[int][]pageRun // by pid, sorted by address
	file map[int]*fileIndex

	mu    sync.Mutex
	cache map[string][]byte // a few decompressed chunks
	order []string
}

type fileIndex struct {
	f      *store.File
	starts []int64 // offset of each chunk
}

func newFileIndex(f *store.File) *fileIndex {
	fi := &fileIndex{f: f}
	var off int64
	for _, c := range f.Chunks {
		fi.starts = append(fi.starts, off)
		off += c.Len
	}
	return fi
}

// read copies len(dst) bytes at off of the file into dst.
func (s *lazySource) read(fi *fileIndex, off int64, dst []byte) error {
	for len(dst) > 0 {
		i := sort.Search(len(fi.starts), func(i int) bool { return fi.starts[i] > off }) - 1
		if i < 0 || i >= len(fi.f.Chunks) {
			return fmt.Errorf("%s: offset %d is outside the file", fi.f.Name, off)
		}
		data, err := s.chunk(fi.f.Chunks[i])
		if err != nil {
			return fmt.Errorf("%s: chunk %d: %w", fi.f.Name, i, err)
		}
		n := copy(dst, data[off-fi.starts[i]:])
		dst, off = dst[n:], off+int64(n)
	}
	return nil
}

func (s *lazySource) chunk(c store.Chunk) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.cache[c.Hash]; ok {
		return d, nil
	}
	d, err := s.st.ReadChunk(s.m, c)
	if err != nil {
		return nil, err
	}
	if len(s.order) >= 16 {
		delete(s.cache, s.order[0])
		s.order = s.order[1:]
	}
	s.cache[c.Hash] = d
	s.order = append(s.order, c.Hash)
	return d, nil
}

// pages implements pageserver.PageSource.
func (s *lazySource) pages(pid int, vaddr uint64, nr uint32) ([]byte, error) {
	runs, fi := s.runs[pid], s.file[pid]
	if fi == nil {
		return nil, fmt.Errorf("no pages for pid %d in generation %d", pid, s.m.Generation)
	}
	// The daemon asks for what the job has; a larger request gets what
	// there is, without reserving memory for the rest.
	out := make([]byte, 0, min(int(nr), 1<<12)*pageserver.PageSize)
	for want := uint64(nr); want > 0; {
		i := sort.Search(len(runs), func(i int) bool { return runs[i].vaddr+runs[i].pages*pageserver.PageSize > vaddr })
		if i == len(runs) || runs[i].vaddr > vaddr {
			break // not dumped: the daemon should not ask; answer what we have
		}
		r := runs[i]
		skip := (vaddr - r.vaddr) / pageserver.PageSize
		n := min(want, r.pages-skip)
		buf := make([]byte, n*pageserver.PageSize)
		if err := s.read(fi, r.off+int64(skip*pageserver.PageSize), buf); err != nil {
			return nil, err
		}
		out = append(out, buf...)
		vaddr += n * pageserver.PageSize
		want -= n
	}
	return out, nil
}

var pidPagemapRE = regexp.MustCompile(`^pagemap-(\d+)\.img$`)

// lazySession is a running lazy restore's page service: cryo's page server
// and CRIU's lazy-pages daemon.
type lazySession struct {
	daemon  *exec.Cmd
	ln      net.Listener
	served  chan error
	sent    int64
	lazy    int64 // bytes left out of the images, to be served
	started time.Time
}

// prepareLazy writes the pagemaps and pages images for a lazy restore into
// images (the other images are already there), and starts the page server
// and CRIU's lazy-pages daemon in work. The caller restores with
// criu.Options.LazyPages and then waits for the session.
func prepareLazy(ctx context.Context, st *store.Store, m *store.Manifest, images, work string, bin criu.Binary, log *slog.Logger) (*lazySession, error) {
	src := &lazySource{st: st, m: m, runs: map[int][]pageRun{}, file: map[int]*fileIndex{}, cache: map[string][]byte{}}
	files := map[string]*store.File{}
	for i := range m.Files {
		files[m.Files[i].Name] = &m.Files[i]
	}
	sess := &lazySession{served: make(chan error, 1), started: time.Now()}
	ents, err := os.ReadDir(images)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if !pidPagemapRE.MatchString(e.Name()) && !pageserver.IsShmemPagemap(e.Name()) {
			continue
		}
		if err := sess.rewrite(src, files, images, e.Name()); err != nil {
			return nil, fmt.Errorf("lazy restore: %s: %w", e.Name(), err)
		}
	}

	sess.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("lazy restore: page server: %w", err)
	}
	go func() {
		c, err := sess.ln.Accept()
		sess.ln.Close()
		if err != nil {
			sess.served <- err
			return
		}
		defer c.Close()
		n, err := pageserver.ServeLazy(c, pageserver.WireFor(bin.Version), src.pages)
		sess.sent = n
		sess.served <- err
	}()
	port := sess.ln.Addr().(*net.TCPAddr).Port
	sess.daemon = criu.LazyPagesDaemon(bin, criu.Options{ImagesDir: images, WorkDir: work,
		PageServer: &criu.PageServerAddr{Address: "127.0.0.1", Port: int32(port)}})
	if err := sess.daemon.Start(); err != nil {
		sess.ln.Close()
		return nil, fmt.Errorf("lazy restore: start criu lazy-pages: %w", err)
	}
	// The restore hands its userfaultfds to the daemon's socket.
	sock := filepath.Join(work, "lazy-pages.socket")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			sess.stop()
			return nil, fmt.Errorf("lazy restore: criu lazy-pages did not start (see %s)", filepath.Join(work, "lazy-pages.log"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	log.Debug("lazy pages", "bytes_to_serve", sess.lazy, "port", port)
	return sess, nil
}

// rewrite turns one stored pagemap (all pages present) into a lazy one:
// runs in lazy-able mappings become PE_LAZY entries served later, the rest
// stay PE_PRESENT with their pages in a new pages image.
func (sess *lazySession) rewrite(src *lazySource, files map[string]*store.File, images, name string) error {
	path := filepath.Join(images, name)
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	pagesID, entries, err := pageserver.ParsePagemap(b)
	if err != nil {
		return err
	}
	pagesName := fmt.Sprintf("pages-%d.img", pagesID)
	pf := files[pagesName]
	if pf == nil {
		return fmt.Errorf("the generation has no %s", pagesName)
	}
	fi := newFileIndex(pf)
	var vmas []vmaRange
	pid := 0
	if mt := pidPagemapRE.FindStringSubmatch(name); mt != nil {
		pid, _ = strconv.Atoi(mt[1])
		if vmas, err = readVMAs(filepath.Join(images, fmt.Sprintf("mm-%d.img", pid))); err != nil {
			return err
		}
	}
	out, err := os.OpenFile(filepath.Join(images, pagesName), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	newImg := &pageserver.Image{PagesID: pagesID}
	var off int64
	var runs []pageRun
	for _, pe := range entries {
		if pe.Flags&pageserver.PEPresent == 0 {
			newImg.Entries = append(newImg.Entries, pe)
			continue
		}
		run := pageRun{vaddr: pe.Vaddr, off: off, pages: uint64(pe.NrPages)}
		off += int64(run.pages * pageserver.PageSize)
		runs = append(runs, run)
		// Split the run where mappings begin and end.
		for a, end := run.vaddr, run.vaddr+run.pages*pageserver.PageSize; a < end; {
			lazy, next := false, end
			if pid != 0 {
				lazy, next = lazyAt(vmas, a, end)
			}
			b := min(next, end)
			n := uint32((b - a) / pageserver.PageSize)
			if lazy {
				newImg.Entries = append(newImg.Entries, pageserver.Entry{Vaddr: a, NrPages: n, Flags: pageserver.PELazy})
				sess.lazy += int64(b - a)
			} else {
				buf := make([]byte, b-a)
				if err := src.read(fi, run.off+int64(a-run.vaddr), buf); err != nil {
					return err
				}
				if _, err := out.Write(buf); err != nil {
					return err
				}
				newImg.Entries = append(newImg.Entries, pageserver.Entry{Vaddr: a, NrPages: n, Flags: pageserver.PEPresent})
			}
			a = b
		}
	}
	if pid != 0 {
		src.runs[pid] = runs
		src.file[pid] = fi
	}
	if b, err = pageserver.PagemapImage(newImg); err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// lazyAt says whether the page at a lies in a lazy-able mapping, and
// where the answer may change (the end of that mapping, or the start of
// the next one).
func lazyAt(vmas []vmaRange, a, limit uint64) (bool, uint64) {
	i := sort.Search(len(vmas), func(i int) bool { return vmas[i].end > a })
	if i == len(vmas) {
		return false, limit
	}
	if v := vmas[i]; v.start <= a {
		return v.lazy, v.end
	}
	return false, vmas[i].start
}

func readVMAs(path string) ([]vmaRange, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	vmas, err := parseVMAs(b, canBeLazy)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return vmas, nil
}

const mmMagic = 0x57492820 // criu/include/magic.h

// parseVMAs reads the mappings of an mm-<pid>.img image, sorted by
// address, each marked by mark (whether its pages may be left to the
// kernel: lazily served, or zero).
func parseVMAs(b []byte, mark func(flags, status uint32) bool) ([]vmaRange, error) {
	msgs, err := pageserver.ImageEntries(b, mmMagic)
	if err != nil {
		return nil, err
	}
	if len(msgs) == 0 {
		return nil, errors.New("no mm entry")
	}
	var me mm.MmEntry
	if err := proto.Unmarshal(msgs[0], &me); err != nil {
		return nil, err
	}
	var out []vmaRange
	for _, v := range me.GetVmas() {
		out = append(out, vmaRange{start: v.GetStart(), end: v.GetEnd(), lazy: mark(v.GetFlags(), v.GetStatus())})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].start < out[j].start })
	return out, nil
}

// wait waits until the daemon has fetched every page (it exits then) and
// the page server is done; it returns the bytes served.
func (sess *lazySession) wait(ctx context.Context) (int64, error) {
	done := make(chan error, 1)
	go func() { done <- sess.daemon.Wait() }()
	var derr error
	select {
	case derr = <-done:
	case <-ctx.Done():
		sess.stop()
		return sess.sent, ctx.Err()
	}
	sess.ln.Close()
	var serr error
	select {
	case serr = <-sess.served:
	case <-time.After(5 * time.Second):
		serr = errors.New("the page server did not finish")
	}
	if derr != nil {
		return sess.sent, fmt.Errorf("criu lazy-pages: %w", derr)
	}
	return sess.sent, serr
}

func (sess *lazySession) stop() {
	if sess.daemon != nil && sess.daemon.Process != nil {
		_ = sess.daemon.Process.Kill()
		_ = sess.daemon.Wait()
	}
	if sess.ln != nil {
		sess.ln.Close()
	}
}
