// Package outputs keeps a job's output files consistent with its
// checkpoints: at a checkpoint it records the size of every regular file
// the job holds open for writing, and on a restore it cuts those files
// back to that size before the job runs again, so that what the job wrote
// after the checkpoint (and writes again after the restore) appears once.
//
// A file is identified by its device and inode as well as its path, and is
// cut only when the file at the path is still that one: it is opened with
// O_NOFOLLOW and never created, renamed or removed. It reads /proc and the
// CRIU images it is given; it never signals a process.
package outputs

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// ImageName is the file of a generation that holds the record.
const ImageName = "outputs.json"

// File is an output file at a checkpoint.
type File struct {
	Path string `json:"path"`
	Size int64  `json:"size"` // at the freeze
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
}

// Open is a regular file the job holds open for writing, as a scan of its
// descriptors found it before the dump.
type Open struct {
	Path     string
	Dev, Ino uint64
	Size     int64 // when scanned: no larger than at the freeze
}

// Scan lists the regular files that the processes hold open for writing,
// by path. Files under /proc, /sys and /dev, deleted ones, and ones the
// node does not see at their path are left out: the last are on mounts of
// the job's own mount namespace (its private TMPDIR: an MPI library's
// session files), whose contents CRIU saves and restores with the job, so
// there is nothing to cut, and nothing at that path outside the job.
func Scan(pids []int) map[string]Open {
	out := map[string]Open{}
	for _, pid := range pids {
		dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			fd := filepath.Join(dir, e.Name())
			path, err := os.Readlink(fd)
			if err != nil || !filepath.IsAbs(path) || strings.HasSuffix(path, " (deleted)") || special(path) {
				continue
			}
			if !writable(pid, e.Name()) {
				continue
			}
			var st unix.Stat_t
			if unix.Stat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
				continue
			}
			var node unix.Stat_t
			if unix.Stat(path, &node) != nil || node.Dev != st.Dev || node.Ino != st.Ino {
				continue
			}
			o := Open{Path: path, Dev: uint64(st.Dev), Ino: st.Ino, Size: st.Size}
			if prev, ok := out[path]; ok && (prev.Dev != o.Dev || prev.Ino != o.Ino) {
				// Two files under one name (one replaced while open): which
				// one a restore reopens is not ours to guess.
				o.Ino = 0
			}
			out[path] = o
		}
	}
	for p, o := range out {
		if o.Ino == 0 {
			delete(out, p)
		}
	}
	return out
}

func special(path string) bool {
	for _, p := range []string{"/proc/", "/sys/", "/dev/"} {
		if strings.HasPrefix(path, p) {
			return true
		}
	}
	return false
}

// writable reads whether pid's descriptor fd is open for writing.
func writable(pid int, fd string) bool {
	f, ok := proc.FDFlags(pid, fd)
	return ok && f&syscall.O_ACCMODE != syscall.O_RDONLY
}

// Record combines a scan taken before the dump with the dumped tree's
// files: each scanned file that the images hold open for writing, with
// its size at the freeze. CRIU records that size for most files; for
// write-only appending ones (logs) it is the largest of the scanned size
// and the positions of the job's descriptors on the file, each of which an
// append left at the end of the file. Files opened after the scan are not
// recorded (and so never cut).
func Record(scan map[string]Open, regs []criu.RegFile) []File {
	size := map[string]int64{}
	exact := map[string]bool{}
	for _, r := range regs {
		if r.Flags&syscall.O_ACCMODE == syscall.O_RDONLY {
			continue
		}
		o, ok := scan[r.Name]
		if !ok {
			continue
		}
		if r.HasSize {
			size[r.Name], exact[r.Name] = int64(r.Size), true
			continue
		}
		if exact[r.Name] {
			continue
		}
		size[r.Name] = max(size[r.Name], o.Size, int64(r.Pos))
	}
	var out []File
	for p, n := range size {
		o := scan[p]
		out = append(out, File{Path: p, Size: n, Dev: o.Dev, Ino: o.Ino})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// Encode and Decode are the record's form in a generation.
func Encode(fs []File) ([]byte, error) { return json.MarshalIndent(fs, "", " ") }

// Decode reads a record written by Encode.
func Decode(b []byte) ([]File, error) {
	var fs []File
	if err := json.Unmarshal(b, &fs); err != nil {
		return nil, fmt.Errorf("%s: %w", ImageName, err)
	}
	return fs, nil
}

// Cut is a file cut back to its size at the checkpoint.
type Cut struct {
	Path     string `json:"path"`
	From, To int64
}

func (c Cut) String() string {
	return fmt.Sprintf("%s from %d to %d bytes", c.Path, c.From, c.To)
}

// ErrReplaced means the file at a recorded path is no longer the file the
// job had open (another inode, or not a regular file): it is left alone.
var ErrReplaced = errors.New("not the file the job had open")

// Truncate cuts each recorded file that has grown since the checkpoint
// back to its recorded size. The file at the path is opened without
// following a symbolic link and cut only if it is the recorded inode; a
// file that is missing, replaced or smaller is left alone (and named in
// the error). Call it only when no process of the job runs.
func Truncate(fs []File) ([]Cut, error) {
	var cuts []Cut
	var errs []error
	for _, f := range fs {
		c, err := truncate(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.Path, err))
			continue
		}
		if c != nil {
			cuts = append(cuts, *c)
		}
	}
	return cuts, errors.Join(errs...)
}

func truncate(f File) (*Cut, error) {
	if !filepath.IsAbs(f.Path) || f.Size < 0 {
		return nil, fmt.Errorf("bad record (size %d)", f.Size)
	}
	fd, err := unix.Open(f.Path, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("%w: it is a symbolic link now", ErrReplaced)
		}
		return nil, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != f.Dev || st.Ino != f.Ino {
		return nil, ErrReplaced
	}
	if st.Size <= f.Size {
		return nil, nil // nothing written since (or cut by someone else)
	}
	if err := unix.Ftruncate(fd, f.Size); err != nil {
		return nil, err
	}
	return &Cut{Path: f.Path, From: st.Size, To: f.Size}, nil
}
