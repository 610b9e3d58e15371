package criu

import (
	"fmt"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/crit"
	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pstree"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/stats"
	"google.golang.org/protobuf/proto"
)

// Pagemap entry flags (criu/include/pagemap.h).
const (
	peParent  = 1 << 0
	peLazy    = 1 << 1
	pePresent = 1 << 2
)

// PageSize is the page size CRIU images use on this architecture.
var PageSize = uint64(os.Getpagesize())

func decode(path string, msg proto.Message) (*crit.CriuImage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	img, err := crit.New(f, nil, "", false, false).Decode(msg)
	if err != nil {
		return nil, fmt.Errorf("decode %s: %w", filepath.Base(path), err)
	}
	return img, nil
}

// Task is one process of a dumped tree.
type Task struct {
	PID, PPID, PGID, SID int
	Threads              int
	TIDs                 []int
	Comm                 string
}

// ReadTree lists the processes of the tree imaged in dir, root first.
func ReadTree(dir string) ([]Task, error) {
	img, err := decode(filepath.Join(dir, "pstree.img"), &pstree.PstreeEntry{})
	if err != nil {
		return nil, err
	}
	var tasks []Task
	for _, e := range img.Entries {
		p := e.Message.(*pstree.PstreeEntry)
		t := Task{PID: int(p.GetPid()), PPID: int(p.GetPpid()), PGID: int(p.GetPgid()), SID: int(p.GetSid()), Threads: len(p.GetThreads())}
		for _, tid := range p.GetThreads() {
			t.TIDs = append(t.TIDs, int(tid))
		}
		if core, err := decode(filepath.Join(dir, fmt.Sprintf("core-%d.img", t.PID)), &criucore.CoreEntry{}); err == nil && len(core.Entries) > 0 {
			t.Comm = core.Entries[0].Message.(*criucore.CoreEntry).GetTc().GetComm()
		}
		tasks = append(tasks, t)
	}
	if len(tasks) == 0 {
		return nil, fmt.Errorf("%s: pstree.img lists no process", dir)
	}
	return tasks, nil
}

// DumpStats are CRIU's own timings of a dump (stats-dump).
type DumpStats struct {
	FreezingMS, FrozenMS, MemdumpMS, MemwriteMS int64
	PagesScanned, PagesWritten                  int64
}

// ReadDumpStats reads stats-dump from dir (CRIU's work directory).
func ReadDumpStats(dir string) (DumpStats, error) {
	img, err := decode(filepath.Join(dir, "stats-dump"), &stats.StatsEntry{})
	if err != nil {
		return DumpStats{}, err
	}
	if len(img.Entries) == 0 {
		return DumpStats{}, fmt.Errorf("stats-dump is empty")
	}
	d := img.Entries[0].Message.(*stats.StatsEntry).GetDump()
	return DumpStats{
		FreezingMS:   int64(d.GetFreezingTime()) / 1000,
		FrozenMS:     int64(d.GetFrozenTime()) / 1000,
		MemdumpMS:    int64(d.GetMemdumpTime()) / 1000,
		MemwriteMS:   int64(d.GetMemwriteTime()) / 1000,
		PagesScanned: int64(d.GetPagesScanned()),
		PagesWritten: int64(d.GetPagesWritten()),
	}, nil
}

// PageRun is a run of pages present in a pages image, at a virtual address.
type PageRun struct {
	Vaddr  uint64 // address of the first page
	Offset int64  // offset of the first page in the pages image
	Pages  uint64
}

var pagemapRE = regexp.MustCompile(`^pagemap-.*\.img$`)

// PageRuns maps each pages image in dir ("pages-N.img") to the runs of
// pages it holds, from the pagemap images.
func PageRuns(dir string) (map[string][]PageRun, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string][]PageRun{}
	for _, e := range ents {
		if !pagemapRE.MatchString(e.Name()) {
			continue
		}
		img, err := decode(filepath.Join(dir, e.Name()), &pagemap.PagemapEntry{})
		if err != nil {
			return nil, err
		}
		if len(img.Entries) == 0 {
			continue
		}
		head, ok := img.Entries[0].Message.(*pagemap.PagemapHead)
		if !ok {
			return nil, fmt.Errorf("%s: no pagemap head", e.Name())
		}
		name := "pages-" + strconv.Itoa(int(head.GetPagesId())) + ".img"
		var off int64
		for _, x := range img.Entries[1:] {
			pe := x.Message.(*pagemap.PagemapEntry)
			present := !pe.GetInParent()
			if pe.Flags != nil {
				present = pe.GetFlags()&pePresent != 0
			}
			if !present {
				continue
			}
			run := PageRun{Vaddr: pe.GetVaddr(), Offset: off, Pages: pageserver.EntryPages(pe)}
			off += int64(run.Pages * PageSize)
			// CRIU splits one mapping into runs of a few hundred pages, and
			// where it splits depends on what came before: merge runs that
			// continue each other, so that cuts follow addresses only.
			if rs := out[name]; len(rs) > 0 {
				last := &rs[len(rs)-1]
				if last.Vaddr+last.Pages*PageSize == run.Vaddr && last.Offset+int64(last.Pages*PageSize) == run.Offset {
					last.Pages += run.Pages
					continue
				}
			}
			out[name] = append(out[name], run)
		}
	}
	return out, nil
}

// Cuts returns the offsets in a pages image where a new address window of
// window bytes begins, and where each run begins: chunk boundaries that
// depend only on a page's address, so that memory that did not change
// between two dumps is cut into identical chunks even if other mappings
// appeared, grew or moved.
func Cuts(runs []PageRun, window uint64) []int64 {
	var cuts []int64
	for _, r := range runs {
		cuts = append(cuts, r.Offset)
		end := r.Vaddr + r.Pages*PageSize
		next := (r.Vaddr/window + 1) * window
		for a := next; a < end; a += window {
			cuts = append(cuts, r.Offset+int64(a-r.Vaddr))
		}
	}
	sort.Slice(cuts, func(i, j int) bool { return cuts[i] < cuts[j] })
	return cuts
}

// IsPages tells whether an image file holds memory pages.
func IsPages(name string) bool {
	return strings.HasPrefix(filepath.Base(name), "pages-") && strings.HasSuffix(name, ".img")
}
