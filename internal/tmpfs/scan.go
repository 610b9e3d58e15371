package tmpfs

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// Found is a file on a tmpfs that the job's processes map or hold open.
type Found struct {
	Path     string
	Dev, Ino uint64
	Size     int64 // when scanned
	// PID and Comm name a process that uses it (for messages).
	PID  int
	Comm string
	// AppendOnly: every use is a descriptor open for appending only.
	AppendOnly bool
}

type fileID struct{ dev, ino uint64 }

// Scan lists the regular files on tmpfs file systems that the processes
// pids map or hold open, by path, sorted. Deleted files (CRIU keeps those
// itself, as ghost files) and files not found at their path as the same
// inode (on mounts of another mount namespace, or replaced) are left out.
// Past MaxFiles files or MaxBytes of contents it fails with ErrTooMuch,
// naming the file that went past the bound and a process that uses it.
func Scan(pids []int) ([]Found, error) {
	found := map[fileID]*Found{}
	var order []fileID
	add := func(f Found, appendOnly bool) {
		id := fileID{f.Dev, f.Ino}
		if prev, ok := found[id]; ok {
			prev.AppendOnly = prev.AppendOnly && appendOnly
			return
		}
		f.AppendOnly = appendOnly
		found[id] = &f
		order = append(order, id)
	}
	for _, pid := range pids {
		comm := commOf(pid)
		for _, u := range descriptors(pid) {
			if f, ok := onTmpfs(u.path, u.dev, u.ino); ok {
				f.PID, f.Comm = pid, comm
				add(f, u.appendOnly)
			}
		}
		for _, u := range mappings(pid) {
			if f, ok := onTmpfs(u.path, u.dev, u.ino); ok {
				f.PID, f.Comm = pid, comm
				add(f, false)
			}
		}
	}
	out := make([]Found, 0, len(order))
	for _, id := range order {
		out = append(out, *found[id])
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	var total int64
	for i, f := range out {
		total += f.Size
		if int64(i) >= maxFiles || total > maxBytes {
			return nil, fmt.Errorf("pid %d (%s) uses %s on a tmpfs (%d MiB): with it the job's tmpfs files are %d, %d MiB, more than the %d files and %d MiB a checkpoint saves of a job without namespaces of its own; keep less in /dev/shm and tmpfs directories, or run the job in namespaces of its own (cryo run --namespaces on): %w",
				f.PID, f.Comm, f.Path, f.Size>>20, i+1, total>>20, maxFiles, maxBytes>>20, ErrTooMuch)
		}
	}
	return out, nil
}

// use is a file a process uses, as /proc names it.
type use struct {
	path       string
	dev, ino   uint64
	appendOnly bool
}

// descriptors are the regular files pid holds open.
func descriptors(pid int) []use {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []use
	for _, e := range ents {
		fd := filepath.Join(dir, e.Name())
		p, err := os.Readlink(fd)
		if err != nil || !filepath.IsAbs(p) || strings.HasSuffix(p, " (deleted)") {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue
		}
		var fs unix.Statfs_t
		if unix.Statfs(fd, &fs) != nil || fs.Type != unix.TMPFS_MAGIC {
			continue
		}
		out = append(out, use{path: p, dev: uint64(st.Dev), ino: st.Ino, appendOnly: appendOnly(pid, e.Name())})
	}
	return out
}

// appendOnly reads whether pid's descriptor fd is open for appending only.
func appendOnly(pid int, fd string) bool {
	f, ok := proc.FDFlags(pid, fd)
	return ok && f&syscall.O_ACCMODE == syscall.O_WRONLY && f&syscall.O_APPEND != 0
}

// mappings are the files pid maps, from /proc/PID/maps (which, unlike
// map_files, a user may read without CAP_CHECKPOINT_RESTORE): each
// line's device and inode say which file it is.
func mappings(pid int) []use {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "maps"))
	if err != nil {
		return nil
	}
	defer f.Close()
	seen := map[fileID]bool{}
	var out []use
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		u, ok := parseMapsLine(sc.Text())
		if !ok || seen[fileID{u.dev, u.ino}] {
			continue
		}
		seen[fileID{u.dev, u.ino}] = true
		out = append(out, u)
	}
	return out
}

// parseMapsLine reads "start-end perms offset MAJ:MIN inode   /path" for
// a mapping of a file that has not been deleted.
func parseMapsLine(line string) (use, bool) {
	rest := line
	var fs [5]string
	for i := range fs {
		rest = strings.TrimLeft(rest, " ")
		var ok bool
		if fs[i], rest, ok = strings.Cut(rest, " "); !ok {
			return use{}, false
		}
	}
	p := strings.TrimLeft(rest, " ")
	if !strings.HasPrefix(p, "/") || strings.HasSuffix(p, " (deleted)") {
		return use{}, false
	}
	maj, min, ok := strings.Cut(fs[3], ":")
	ma, err1 := strconv.ParseUint(maj, 16, 32)
	mi, err2 := strconv.ParseUint(min, 16, 32)
	ino, err3 := strconv.ParseUint(fs[4], 10, 64)
	if !ok || err1 != nil || err2 != nil || err3 != nil || ino == 0 {
		return use{}, false
	}
	return use{path: p, dev: unix.Mkdev(uint32(ma), uint32(mi)), ino: ino}, true
}

// onTmpfs checks that the file at path, not following a link in its
// place, is the regular file dev:ino, on a tmpfs.
func onTmpfs(path string, dev, ino uint64) (Found, bool) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Dev) != dev || st.Ino != ino {
		return Found{}, false
	}
	var fs unix.Statfs_t
	if unix.Statfs(path, &fs) != nil || fs.Type != unix.TMPFS_MAGIC {
		return Found{}, false
	}
	return Found{Path: path, Dev: dev, Ino: ino, Size: st.Size}, true
}

func commOf(pid int) string {
	b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
	return strings.TrimSpace(string(b))
}
