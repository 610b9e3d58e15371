package tmpfs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Saved is what Save copied: the record (without digests until Seal) and
// where each part is.
type Saved struct {
	Record Record
	dir    string
	// Skipped names the files found by Scan that were not saved (gone,
	// replaced or unreadable by the time the job was frozen), and why.
	Skipped []string
}

// PartPath is the copy of part k of file i.
func (s *Saved) PartPath(i, k int) string {
	return filepath.Join(s.dir, strconv.Itoa(i)+"."+strconv.Itoa(k))
}

// Save copies the contents of the files Scan found into dir (which must
// exist and be private), in parts of PartSize, with their mode and owner.
// Call it while the job is frozen: what it copies is what the job's
// memory images go with. Each file is opened by its path without following
// a link in its place and used only if it is still the inode Scan found; a
// file that is gone, replaced or unreadable is skipped (and named in
// Skipped), one that grew past MaxBytes with the others fails the save.
func Save(found []Found, dir string) (*Saved, error) {
	s := &Saved{dir: dir}
	var total int64
	dirs := map[string]bool{}
	for _, f := range found {
		file, st, err := openFound(f)
		if err != nil {
			s.Skipped = append(s.Skipped, fmt.Sprintf("%s: %v", f.Path, err))
			continue
		}
		total += st.Size
		if total > maxBytes {
			file.Close()
			return nil, fmt.Errorf("pid %d (%s) uses %s on a tmpfs, which took the job's tmpfs files past the %d MiB a checkpoint saves: %w",
				f.PID, f.Comm, f.Path, maxBytes>>20, ErrTooMuch)
		}
		i := len(s.Record.Files)
		err = s.copyParts(file, i, st.Size)
		file.Close()
		if err != nil {
			return nil, fmt.Errorf("save %s: %w", f.Path, err)
		}
		s.Record.Files = append(s.Record.Files, File{Path: f.Path, Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid,
			Size: st.Size, AppendOnly: f.AppendOnly})
		s.Record.Dirs = append(s.Record.Dirs, parents(f.Path, uint64(st.Dev), dirs)...)
	}
	return s, nil
}

// openFound opens f's file for reading if it is still f's inode.
func openFound(f Found) (*os.File, unix.Stat_t, error) {
	var st unix.Stat_t
	fd, err := unix.Open(f.Path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, st, err
	}
	file := os.NewFile(uintptr(fd), f.Path)
	var fs unix.Statfs_t
	if err := unix.Fstat(fd, &st); err != nil {
		file.Close()
		return nil, st, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != f.Dev || st.Ino != f.Ino {
		file.Close()
		return nil, st, errors.New("replaced since the scan")
	}
	if err := unix.Fstatfs(fd, &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		file.Close()
		return nil, st, errors.New("not on a tmpfs")
	}
	return file, st, nil
}

func (s *Saved) copyParts(src *os.File, i int, size int64) error {
	for k := 0; k < Parts(size); k++ {
		n := min(int64(PartSize), size-int64(k)*PartSize)
		dst, err := os.OpenFile(s.PartPath(i, k), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.CopyN(dst, src, n) // copy_file_range: kernel to kernel
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// parents are the directories above path on the same file system (dev),
// below its root, that are not in seen yet (and now are), outermost first.
func parents(path string, dev uint64, seen map[string]bool) []Dir {
	var out []Dir
	for d := filepath.Dir(path); d != "/"; d = filepath.Dir(d) {
		var st, up unix.Stat_t
		if unix.Lstat(d, &st) != nil || uint64(st.Dev) != dev || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			break
		}
		if unix.Lstat(filepath.Dir(d), &up) != nil || uint64(up.Dev) != dev {
			break // d is the root of its tmpfs: there whatever happens
		}
		if seen[d] {
			break
		}
		seen[d] = true
		out = append([]Dir{{Path: d, Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}}, out...)
	}
	return out
}

// Seal computes each saved file's digest from its copy (once the job runs
// again: it is no part of the frozen time) and returns the record.
func (s *Saved) Seal() (*Record, error) {
	for i := range s.Record.Files {
		f := &s.Record.Files[i]
		h := sha256.New()
		var n int64
		for k := 0; k < Parts(f.Size); k++ {
			p, err := os.Open(s.PartPath(i, k))
			if err != nil {
				return nil, err
			}
			m, err := io.Copy(h, p)
			p.Close()
			if err != nil {
				return nil, err
			}
			n += m
		}
		if n != f.Size {
			return nil, fmt.Errorf("%s: saved %d bytes of %d", f.Path, n, f.Size)
		}
		f.SHA256 = hex.EncodeToString(h.Sum(nil))
	}
	return &s.Record, nil
}
