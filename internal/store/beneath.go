package store

// Everything inside a store is reached through the store directory's file
// descriptor, opened once by Open or Create, and never by following a
// link: cryo may run as root on a store that a user can write, and a
// symbolic link planted there (staging -> /etc, lock -> /etc/nologin) must
// make the operation fail, not act elsewhere. Paths below are relative to
// the store; each one is resolved with openat2(RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS) where the kernel has it (Linux 5.6), else one
// component at a time with O_NOFOLLOW. Removal, renaming and creation act
// on the last component through its parent's descriptor (unlinkat,
// renameat, mkdirat never follow a last-component link), and a directory
// is emptied by walking descriptors, never paths.

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// noOpenat2 is set once openat2 turned out to be missing (ENOSYS), or by
// tests of the fallback.
var noOpenat2 atomic.Bool

// cleanRel checks that rel names something beneath a directory: relative,
// clean, without "..", empty or NUL components.
func cleanRel(rel string) error {
	if rel == "" || rel == "." {
		return nil
	}
	if strings.HasPrefix(rel, "/") || path.Clean(rel) != rel || strings.ContainsRune(rel, 0) {
		return fmt.Errorf("%q is not a clean relative path", rel)
	}
	for _, c := range strings.Split(rel, "/") {
		if c == ".." {
			return fmt.Errorf("%q leaves its directory", rel)
		}
	}
	return nil
}

// openBeneath opens rel beneath the directory dirfd without following any
// link, also none in its last component. flags are open(2)'s.
func openBeneath(dirfd int, rel string, flags int, mode uint32) (int, error) {
	if err := cleanRel(rel); err != nil {
		return -1, err
	}
	if rel == "" {
		rel = "."
	}
	flags |= unix.O_CLOEXEC | unix.O_NOFOLLOW
	if !noOpenat2.Load() {
		how := unix.OpenHow{Flags: uint64(flags), Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
		if flags&unix.O_CREAT != 0 {
			how.Mode = uint64(mode)
		}
		for {
			fd, err := unix.Openat2(dirfd, rel, &how)
			if err == unix.EINTR {
				continue
			}
			if err == unix.ENOSYS {
				noOpenat2.Store(true)
				break
			}
			if err != nil {
				return -1, err
			}
			return fd, nil
		}
	}
	return openNoFollow(dirfd, rel, flags, mode)
}

// openNoFollow is openBeneath without openat2: every directory on the way
// is opened with O_NOFOLLOW|O_DIRECTORY, and the last component with
// O_NOFOLLOW.
func openNoFollow(dirfd int, rel string, flags int, mode uint32) (int, error) {
	parts := strings.Split(rel, "/")
	cur := dirfd
	closeCur := func() {
		if cur != dirfd {
			unix.Close(cur)
		}
	}
	for _, p := range parts[:len(parts)-1] {
		fd, err := unix.Openat(cur, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		closeCur()
		if err != nil {
			return -1, err
		}
		cur = fd
	}
	fd, err := unix.Openat(cur, parts[len(parts)-1], flags, mode)
	closeCur()
	return fd, err
}

// parentOf opens the directory holding rel and returns it with rel's last
// component. The caller closes the descriptor.
func parentOf(dirfd int, rel string) (int, string, error) {
	if err := cleanRel(rel); err != nil {
		return -1, "", err
	}
	dir, name := path.Split(rel)
	if name == "" {
		return -1, "", fmt.Errorf("%q has no last component", rel)
	}
	fd, err := openBeneath(dirfd, strings.TrimSuffix(dir, "/"), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	return fd, name, err
}

// root is a directory every operation of a store goes through.
type root struct {
	fd   int
	path string // for messages only
}

func (r *root) pathOf(rel string) string { return path.Join(r.path, rel) }

func (r *root) wrap(op, rel string, err error) error {
	if err == nil {
		return nil
	}
	return &fs.PathError{Op: op, Path: r.pathOf(rel), Err: err}
}

// open opens rel for reading, or with flags, as an *os.File.
func (r *root) open(rel string, flags int, mode os.FileMode) (*os.File, error) {
	fd, err := openBeneath(r.fd, rel, flags, uint32(mode.Perm()))
	if err != nil {
		return nil, r.wrap("open", rel, err)
	}
	return os.NewFile(uintptr(fd), r.pathOf(rel)), nil
}

// readFile reads rel whole, refusing one longer than limit before reading it.
func (r *root) readFile(rel string, limit int64) ([]byte, error) {
	f, err := r.open(rel, unix.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", r.pathOf(rel))
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d a cryo store holds there", r.pathOf(rel), st.Size(), limit)
	}
	b := make([]byte, 0, st.Size()+1)
	b, err = readAllLimit(f, b, limit)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.pathOf(rel), err)
	}
	return b, nil
}

// readAllLimit reads r to its end into b, failing past limit bytes.
func readAllLimit(r io.Reader, b []byte, limit int64) ([]byte, error) {
	lr := io.LimitReader(r, limit+1)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := lr.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return nil, fmt.Errorf("longer than %d bytes", limit)
		}
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// writeFileAtomic writes rel whole (temporary sibling, fsync, rename,
// fsync of the directory).
func (r *root) writeFileAtomic(rel string, b []byte) error {
	pfd, name, err := parentOf(r.fd, rel)
	if err != nil {
		return r.wrap("write", rel, err)
	}
	defer unix.Close(pfd)
	tmp := name + ".tmp"
	_ = unix.Unlinkat(pfd, tmp, 0)
	fd, err := unix.Openat(pfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, fileMode)
	if err != nil {
		return r.wrap("create", rel+".tmp", err)
	}
	f := os.NewFile(uintptr(fd), r.pathOf(rel+".tmp"))
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(pfd, tmp, pfd, name)
	}
	if err == nil {
		err = unix.Fsync(pfd)
	}
	if err != nil {
		_ = unix.Unlinkat(pfd, tmp, 0)
		return r.wrap("write", rel, err)
	}
	return nil
}

// mkdirAll creates rel and its missing parents (mode dirMode), none of
// them through a link.
func (r *root) mkdirAll(rel string) error {
	if err := cleanRel(rel); err != nil {
		return err
	}
	if rel == "" {
		return nil
	}
	cur := r.fd
	defer func() {
		if cur != r.fd {
			unix.Close(cur)
		}
	}()
	for _, p := range strings.Split(rel, "/") {
		err := unix.Mkdirat(cur, p, dirMode)
		if err != nil && err != unix.EEXIST {
			return r.wrap("mkdir", rel, err)
		}
		fd, err := unix.Openat(cur, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return r.wrap("mkdir", rel, err)
		}
		if cur != r.fd {
			unix.Close(cur)
		}
		cur = fd
	}
	return nil
}

// readDir lists rel's entries (names and types, sorted by name).
func (r *root) readDir(rel string) ([]fs.DirEntry, error) {
	f, err := r.open(rel, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ents, err := f.ReadDir(-1)
	if err != nil {
		return nil, r.wrap("readdir", rel, err)
	}
	sortEntries(ents)
	return ents, nil
}

// stat is lstat of rel beneath the root.
func (r *root) stat(rel string) (unix.Stat_t, error) {
	var st unix.Stat_t
	pfd, name, err := parentOf(r.fd, rel)
	if err != nil {
		return st, r.wrap("stat", rel, err)
	}
	defer unix.Close(pfd)
	err = unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	return st, r.wrap("stat", rel, err)
}

// exists reports whether rel exists (as anything, a link included).
func (r *root) exists(rel string) bool {
	_, err := r.stat(rel)
	return err == nil
}

// rename renames from to to, both beneath the root.
func (r *root) rename(from, to string) error {
	ffd, fname, err := parentOf(r.fd, from)
	if err != nil {
		return r.wrap("rename", from, err)
	}
	defer unix.Close(ffd)
	tfd, tname, err := parentOf(r.fd, to)
	if err != nil {
		return r.wrap("rename", to, err)
	}
	defer unix.Close(tfd)
	if err := unix.Renameat(ffd, fname, tfd, tname); err != nil {
		return fmt.Errorf("rename %s to %s: %w", r.pathOf(from), r.pathOf(to), err)
	}
	return nil
}

// remove removes the file (or empty directory, or link) rel.
func (r *root) remove(rel string) error {
	pfd, name, err := parentOf(r.fd, rel)
	if err != nil {
		return r.wrap("remove", rel, err)
	}
	defer unix.Close(pfd)
	err = unix.Unlinkat(pfd, name, 0)
	if err == unix.EISDIR || err == unix.EPERM {
		err = unix.Unlinkat(pfd, name, unix.AT_REMOVEDIR)
	}
	return r.wrap("remove", rel, err)
}

// removeAll removes rel and everything beneath it, walking directory
// descriptors: a link inside is removed, never followed. A missing rel is
// no error.
func (r *root) removeAll(rel string) error {
	pfd, name, err := parentOf(r.fd, rel)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return r.wrap("remove", rel, err)
	}
	defer unix.Close(pfd)
	return r.wrap("remove", rel, removeAt(pfd, name, 0))
}

// removeAt removes name in the directory dfd, and what it holds.
func removeAt(dfd int, name string, depth int) error {
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR && err != unix.EPERM {
		return err
	}
	if depth > 64 {
		return errors.New("directories nested too deep")
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), name)
	var errs []error
	for {
		names, rerr := d.Readdirnames(256)
		for _, n := range names {
			if e := removeAt(fd, n, depth+1); e != nil {
				errs = append(errs, e)
			}
		}
		if rerr != nil || len(names) == 0 {
			break
		}
	}
	d.Close()
	if err := unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// syncDir fsyncs the directory rel.
func (r *root) syncDir(rel string) error {
	fd, err := openBeneath(r.fd, rel, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return r.wrap("fsync", rel, err)
	}
	defer unix.Close(fd)
	return r.wrap("fsync", rel, unix.Fsync(fd))
}

func sortEntries(ents []fs.DirEntry) {
	slices.SortFunc(ents, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
}
