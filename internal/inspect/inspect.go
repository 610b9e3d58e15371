// Package inspect describes a committed checkpoint from its store alone:
// the process tree with command lines, memory by process, open files and
// sockets, offload contexts, CRIU's dump statistics, and how the
// generation is stored (chunks, deduplication, compression).
//
// It materializes only the small CRIU images (never the pages) into a
// private temporary directory, and reads from the page images just the
// chunks holding each process's argv. It takes the store's shared lock
// and writes nothing into the store.
package inspect

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/tmpfs"
)

// Report is what Inspect found.
type Report struct {
	Store      string          `json:"store"`
	Generation int             `json:"generation"`
	Created    time.Time       `json:"created"`
	Host       string          `json:"host,omitempty"`
	CreatedBy  string          `json:"created_by,omitempty"`
	RootPID    int             `json:"root_pid"`
	CRIU       store.CRIUInfo  `json:"criu"`
	Processes  []Process       `json:"processes"`
	Memory     Memory          `json:"memory"` // all processes together
	Offload    []store.Offload `json:"offload,omitempty"`
	Dump       DumpStats       `json:"dump"`
	Storage    Storage         `json:"storage"`
	Files      []FileInfo      `json:"files"`
	// TmpfsFiles are the tmpfs files (shared memory) whose contents the
	// generation holds, for a job without namespaces of its own, which a
	// restore brings back before CRIU runs.
	TmpfsFiles []tmpfs.File `json:"tmpfs_files,omitempty"`
	Warnings   []string     `json:"warnings,omitempty"` // what could not be decoded
}

// Process is one task of the checkpointed tree.
type Process struct {
	PID     int      `json:"pid"`
	PPID    int      `json:"ppid"`
	PGID    int      `json:"pgid"`
	SID     int      `json:"sid"`
	Threads int      `json:"threads"`
	Comm    string   `json:"comm"`
	Cmdline []string `json:"cmdline,omitempty"` // argv, when its pages were dumped
	Memory  Memory   `json:"memory"`
	FDs     []FD     `json:"fds,omitempty"`
}

// Memory counts a process's mappings and the pages CRIU dumped of them.
type Memory struct {
	VMAs int `json:"vmas"`
	// MappedBytes is the size of all mappings (virtual).
	MappedBytes int64 `json:"mapped_bytes"`
	// Pages are the pages dumped (from the pagemap), DumpedBytes their size.
	Pages       int64 `json:"pages"`
	DumpedBytes int64 `json:"dumped_bytes"`
	// ZeroPages are dumped pages that lie in all-zero chunks: stored as
	// holes, not as data (a lower bound of the zero pages).
	ZeroPages int64 `json:"zero_pages"`
	// Dumped pages by the kind of mapping that holds them.
	AnonPrivatePages int64 `json:"anon_private_pages"`
	AnonSharedPages  int64 `json:"anon_shared_pages"`
	FilePrivatePages int64 `json:"file_private_pages"`
	FileSharedPages  int64 `json:"file_shared_pages"`
	OtherPages       int64 `json:"other_pages"` // vDSO, stacks of special kinds, ...
}

func (m *Memory) add(o Memory) {
	m.VMAs += o.VMAs
	m.MappedBytes += o.MappedBytes
	m.Pages += o.Pages
	m.DumpedBytes += o.DumpedBytes
	m.ZeroPages += o.ZeroPages
	m.AnonPrivatePages += o.AnonPrivatePages
	m.AnonSharedPages += o.AnonSharedPages
	m.FilePrivatePages += o.FilePrivatePages
	m.FileSharedPages += o.FileSharedPages
	m.OtherPages += o.OtherPages
}

// FD is one open file descriptor (or the working directory, "cwd").
type FD struct {
	FD   string `json:"fd"`
	Type string `json:"type"` // CRIU's fd type: REG, PIPE, UNIXSK, INETSK, ...
	// Desc is the path of a file, or what a pipe or socket joins.
	Desc string `json:"desc"`
}

// DumpStats are CRIU's timings and page counts of the dump.
type DumpStats struct {
	FreezingMS   int64 `json:"freezing_ms"`
	FrozenMS     int64 `json:"frozen_ms"`
	MemdumpMS    int64 `json:"memdump_ms"`
	MemwriteMS   int64 `json:"memwrite_ms"`
	DumpMS       int64 `json:"dump_ms"`
	DurableMS    int64 `json:"durable_ms"`
	PagesScanned int64 `json:"pages_scanned"`
	PagesWritten int64 `json:"pages_written"`
}

// Storage says how the generation is stored.
type Storage struct {
	RawBytes int64 `json:"raw_bytes"` // image bytes, zero chunks included
	// Chunks are the chunk references of all files; ZeroChunks of them
	// are all zeros and have no file.
	Chunks     int   `json:"chunks"`
	ZeroChunks int   `json:"zero_chunks"`
	ZeroBytes  int64 `json:"zero_bytes"`
	// DataBytes are the uncompressed bytes of the non-zero references,
	// StoredBytes their compressed size (a chunk used twice counts twice,
	// as in the manifest's stats).
	DataBytes   int64 `json:"data_bytes"`
	StoredBytes int64 `json:"stored_bytes"`
	// UniqueChunks are the distinct non-zero chunks, UniqueBytes their
	// compressed size: what the generation takes on disk by itself.
	UniqueChunks int   `json:"unique_chunks"`
	UniqueBytes  int64 `json:"unique_bytes"`
	// SharedChunks (SharedBytes) of those are also used by another
	// generation of the store.
	SharedChunks int   `json:"shared_chunks"`
	SharedBytes  int64 `json:"shared_bytes"`
	// NewChunks and NewBytes are what the generation added to the store
	// when it was committed.
	NewChunks int   `json:"new_chunks"`
	NewBytes  int64 `json:"new_bytes"`
	// DedupRatio is UniqueBytes / NewBytes: the space the generation would
	// take alone per byte it added (0 when it added nothing).
	DedupRatio float64 `json:"dedup_ratio"`
	// CompressionRatio is DataBytes / StoredBytes.
	CompressionRatio float64 `json:"compression_ratio"`
	// OtherGenerations are the generations compared for sharing.
	OtherGenerations []int `json:"other_generations,omitempty"`
	// Format is the manifest's format; Packs are the pack files that hold
	// the generation's chunks, and DeltaChunks the chunks stored as the
	// pages that differ from a base (whose bases are in Packs too).
	Format      int      `json:"format"`
	Packs       []string `json:"packs,omitempty"`
	DeltaChunks int      `json:"delta_chunks"`
}

// FileInfo is one stored file of the generation.
type FileInfo struct {
	Name        string `json:"name"`
	Kind        string `json:"kind"`
	Size        int64  `json:"size"`
	Chunks      int    `json:"chunks"`
	ZeroChunks  int    `json:"zero_chunks"`
	StoredBytes int64  `json:"stored_bytes"`
}

// Options choose what to inspect.
type Options struct {
	Store      string
	Generation int    // 0: the newest
	TempDir    string // where the small images go ("": the system's)
	// LockWait bounds the wait for a checkpoint holding the store
	// (default 30 s).
	LockWait time.Duration
}

// Inspect describes a generation of a store.
func Inspect(ctx context.Context, o Options) (*Report, error) {
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	unlock, err := st.LockWithin(ctx, false, o.LockWait)
	if err != nil {
		return nil, err
	}
	defer unlock()
	gens, err := st.Generations()
	if err != nil {
		return nil, err
	}
	gen := o.Generation
	if gen == 0 {
		if len(gens) == 0 {
			return nil, fmt.Errorf("%w: store %s has no checkpoints yet", store.ErrNoGeneration, st.Dir)
		}
		gen = gens[len(gens)-1]
	}
	m, err := st.ReadManifest(gen)
	if err != nil {
		return nil, err
	}
	r := &Report{Store: st.Dir, Generation: gen, Created: m.Created, Host: m.Host, CreatedBy: m.CreatedBy,
		RootPID: m.Job.RootPID, CRIU: m.CRIU, Offload: m.Offload,
		Dump: DumpStats{FreezingMS: m.Stats.FreezingMS, FrozenMS: m.Stats.FrozenMS, MemdumpMS: m.Stats.MemdumpMS,
			MemwriteMS: m.Stats.MemwriteMS, DumpMS: m.Stats.DumpMS, DurableMS: m.Stats.DurableMS,
			PagesScanned: m.Stats.PagesScanned, PagesWritten: m.Stats.PagesWritten},
		Processes: []Process{}, Files: []FileInfo{}}
	r.storage(st, m, gens)

	tmp, err := os.MkdirTemp(o.TempDir, "cryo-inspect-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o700); err != nil {
		return nil, err
	}
	if err := st.Materialize(ctx, m, tmp, "image"); err != nil {
		return nil, err
	}
	// One tree at the top level, or one per subdirectory (Job.Trees).
	dirs := []string{""}
	if len(m.Job.Trees) > 0 {
		dirs = m.Job.Trees
	}
	for _, d := range dirs {
		procs, warns := readTree(st, m, tmp, d)
		r.Processes = append(r.Processes, procs...)
		r.Warnings = append(r.Warnings, warns...)
	}
	if len(r.Processes) == 0 {
		// No images to decode: fall back on what the manifest records.
		for _, p := range m.Job.Processes {
			r.Processes = append(r.Processes, Process{PID: p.PID, PPID: p.PPID, PGID: p.PGID, SID: p.SID, Threads: p.Threads, Comm: p.Comm})
		}
	}
	for _, p := range r.Processes {
		r.Memory.add(p.Memory)
	}
	if err := r.tmpfsFiles(st, m); err != nil {
		r.Warnings = append(r.Warnings, err.Error())
	}
	return r, nil
}

// tmpfsFiles reads the generation's record of the job's tmpfs files, if
// it has one.
func (r *Report) tmpfsFiles(st *store.Store, m *store.Manifest) error {
	for _, f := range m.Files {
		if f.Name != tmpfs.RecordName {
			continue
		}
		if f.Size > tmpfs.MaxRecord {
			return fmt.Errorf("%s: %d bytes, more than a record can be", f.Name, f.Size)
		}
		b, err := st.ReadAt(m, f.Name, 0, f.Size)
		if err != nil {
			return err
		}
		rec, err := tmpfs.Decode(b)
		if err != nil {
			return err
		}
		r.TmpfsFiles = rec.Files
	}
	return nil
}

// storage fills in the storage figures and the file list.
func (r *Report) storage(st *store.Store, m *store.Manifest, gens []int) {
	s := &r.Storage
	unique := map[string]int64{}
	for _, f := range m.Files {
		fi := FileInfo{Name: f.Name, Kind: f.Kind, Size: f.Size, Chunks: len(f.Chunks)}
		s.RawBytes += f.Size
		for _, c := range f.Chunks {
			s.Chunks++
			if c.Zero {
				s.ZeroChunks++
				s.ZeroBytes += c.Len
				fi.ZeroChunks++
				continue
			}
			s.DataBytes += c.Len
			s.StoredBytes += c.Stored
			fi.StoredBytes += c.Stored
			unique[c.Hash] = c.Stored
		}
		r.Files = append(r.Files, fi)
	}
	s.UniqueChunks = len(unique)
	for _, n := range unique {
		s.UniqueBytes += n
	}
	shared := map[string]bool{}
	for _, g := range gens {
		if g == m.Generation {
			continue
		}
		om, err := st.ReadManifest(g)
		if err != nil {
			r.Warnings = append(r.Warnings, fmt.Sprintf("generation %d not compared for sharing: %v", g, err))
			continue
		}
		s.OtherGenerations = append(s.OtherGenerations, g)
		for _, f := range om.Files {
			for _, c := range f.Chunks {
				if _, ok := unique[c.Hash]; ok && !c.Zero {
					shared[c.Hash] = true
				}
			}
		}
	}
	s.Format = m.Format
	if packs, err := st.Packs(); err == nil {
		in := map[string]bool{}
		base := map[string]string{}
		where := map[string]string{}
		for _, p := range packs {
			for _, rec := range p.Records {
				if rec.Kind != "digests" {
					where[rec.Hash] = p.Name
				}
				if rec.Kind == "delta" {
					base[rec.Hash] = rec.Base
				}
			}
		}
		for h := range unique {
			if b, ok := base[h]; ok {
				s.DeltaChunks++
				if p, ok := where[b]; ok {
					in[p] = true
				}
			}
			if p, ok := where[h]; ok {
				in[p] = true
			}
		}
		for p := range in {
			s.Packs = append(s.Packs, p)
		}
		sort.Strings(s.Packs)
	} else {
		r.Warnings = append(r.Warnings, fmt.Sprintf("packs not read: %v", err))
	}
	s.SharedChunks = len(shared)
	for h := range shared {
		s.SharedBytes += unique[h]
	}
	s.NewChunks, s.NewBytes = m.Stats.NewChunks, m.Stats.NewBytes
	if s.NewBytes > 0 {
		s.DedupRatio = float64(s.UniqueBytes) / float64(s.NewBytes)
	}
	if s.StoredBytes > 0 {
		s.CompressionRatio = float64(s.DataBytes) / float64(s.StoredBytes)
	}
	sort.Slice(r.Files, func(i, j int) bool { return r.Files[i].Name < r.Files[j].Name })
}

// join is a path inside a tree's image directory, as the manifest names it.
func join(tree, name string) string {
	if tree == "" {
		return name
	}
	return filepath.ToSlash(filepath.Join(tree, name))
}
