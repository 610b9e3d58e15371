package safefs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrBadName means a name is not a single path component.
var ErrBadName = errors.New("not a single path component")

const dirFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC

// Dir is an open directory. Its methods act on entries of that directory,
// never following a symbolic link in their place.
type Dir struct {
	fd   int
	name string // for messages: the path it was opened by
}

// OpenDir opens the directory at path. The path itself is resolved as
// usual (symbolic links included): it is the caller's trusted starting
// point, whose owner the caller checks with Stat.
func OpenDir(path string) (*Dir, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &Dir{fd: fd, name: path}, nil
}

// Fd is the directory's file descriptor, valid until Close.
func (d *Dir) Fd() int { return d.fd }

// Name is the path the directory was opened by (for messages).
func (d *Dir) Name() string { return d.name }

// Path names the opened directory itself (/proc/self/fd/N), whatever is
// renamed meanwhile. Components appended to it are looked up by name.
func (d *Dir) Path() string { return "/proc/self/fd/" + strconv.Itoa(d.fd) }

// Close closes the directory.
func (d *Dir) Close() error {
	if d == nil || d.fd < 0 {
		return nil
	}
	err := unix.Close(d.fd)
	d.fd = -1
	return err
}

// Stat describes the directory.
func (d *Dir) Stat() (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstat(d.fd, &st)
	return st, d.err("stat", "", err)
}

// Chown gives the directory to uid:gid.
func (d *Dir) Chown(uid, gid int) error { return d.err("chown", "", unix.Fchown(d.fd, uid, gid)) }

// Chmod sets the directory's permissions.
func (d *Dir) Chmod(mode uint32) error { return d.err("chmod", "", unix.Fchmod(d.fd, mode)) }

func (d *Dir) err(op, name string, err error) error {
	if err == nil {
		return nil
	}
	p := d.name
	if name != "" {
		p += "/" + name
	}
	return &os.PathError{Op: op, Path: p, Err: err}
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("%q: %w", name, ErrBadName)
	}
	return nil
}

// Open opens the subdirectory name. A symbolic link (or anything but a
// directory) in its place fails (ELOOP, ENOTDIR); a missing one matches
// os.ErrNotExist.
func (d *Dir) Open(name string) (*Dir, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, dirFlags, 0)
	if err != nil {
		return nil, d.err("open", name, err)
	}
	return &Dir{fd: fd, name: d.name + "/" + name}, nil
}

// Mkdir creates the subdirectory name with mode (less the umask) unless
// it exists, and opens it; created says whether it was made here. What
// exists in its place must be a directory, not a link to one.
func (d *Dir) Mkdir(name string, mode uint32) (sub *Dir, created bool, err error) {
	if err := checkName(name); err != nil {
		return nil, false, err
	}
	err = unix.Mkdirat(d.fd, name, mode)
	created = err == nil
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, false, d.err("mkdir", name, err)
	}
	sub, err = d.Open(name)
	return sub, created, err
}

// OpenFile opens the file name with flag (os.O_* or unix.O_*) and perm,
// refusing a symbolic link in its place.
func (d *Dir) OpenFile(name string, flag int, perm os.FileMode) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, flag|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(perm.Perm()))
	if err != nil {
		return nil, d.err("open", name, err)
	}
	return os.NewFile(uintptr(fd), d.name+"/"+name), nil
}

// ChownAt gives the entry name (not what a link points to) to uid:gid.
func (d *Dir) ChownAt(name string, uid, gid int) error {
	if err := checkName(name); err != nil {
		return err
	}
	return d.err("chown", name, unix.Fchownat(d.fd, name, uid, gid, unix.AT_SYMLINK_NOFOLLOW))
}

// ReadDir lists the directory (through a descriptor of its own, so d's
// offset is left alone).
func (d *Dir) ReadDir() ([]os.DirEntry, error) {
	own, err := unix.Openat(d.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, d.err("open", "", err)
	}
	f := os.NewFile(uintptr(own), d.name)
	defer f.Close()
	return f.ReadDir(-1)
}

// ChownTree gives the directory and everything below it to uid:gid,
// never following a symbolic link (a link itself is chowned). Meant for a
// tree nobody but the caller could write to so far.
func (d *Dir) ChownTree(uid, gid int) error {
	ents, err := d.ReadDir()
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if e.IsDir() {
			sub, err := d.Open(e.Name())
			if err != nil {
				errs = append(errs, err)
				continue
			}
			errs = append(errs, sub.ChownTree(uid, gid))
			sub.Close()
			continue
		}
		errs = append(errs, d.ChownAt(e.Name(), uid, gid))
	}
	errs = append(errs, d.Chown(uid, gid))
	return errors.Join(errs...)
}

// RemoveAll removes the entry name and, if it is a directory, everything
// below it. A symbolic link is removed, never followed, at any depth.
func (d *Dir) RemoveAll(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	// os.RemoveAll opens the parent by this path (the directory d holds,
	// through its /proc/self/fd link) and works below it with openat and
	// O_NOFOLLOW.
	return os.RemoveAll(d.Path() + "/" + name)
}

// RemoveContents removes every entry of the directory except those named
// in keep, and returns how many it removed.
func (d *Dir) RemoveContents(keep ...string) (int, error) {
	ents, err := d.ReadDir()
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
outer:
	for _, e := range ents {
		for _, k := range keep {
			if e.Name() == k {
				continue outer
			}
		}
		if err := d.RemoveAll(e.Name()); err != nil {
			errs = append(errs, fmt.Errorf("%s/%s: %w", d.name, e.Name(), err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// OpenBeneath opens the relative path rel below the directory for
// reading, refusing symbolic links in every component and any escape
// from the directory ("..", an absolute path).
func (d *Dir) OpenBeneath(rel string) (*os.File, error) {
	if rel == "" || strings.HasPrefix(rel, "/") {
		return nil, fmt.Errorf("%q: not a relative path", rel)
	}
	how := unix.OpenHow{Flags: unix.O_RDONLY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
	fd, err := unix.Openat2(d.fd, rel, &how)
	if errors.Is(err, unix.ENOSYS) {
		return d.openWalk(rel) // kernels before 5.6
	}
	if err != nil {
		return nil, d.err("open", rel, err)
	}
	return os.NewFile(uintptr(fd), d.name+"/"+rel), nil
}

// openWalk is OpenBeneath one component at a time.
func (d *Dir) openWalk(rel string) (*os.File, error) {
	parts := strings.Split(rel, "/")
	cur := d
	release := func() {
		if cur != d {
			cur.Close()
		}
	}
	for _, p := range parts[:len(parts)-1] {
		if p == "" || p == "." {
			continue
		}
		next, err := cur.Open(p) // ".." is refused there
		release()
		if err != nil {
			return nil, err
		}
		cur = next
	}
	defer release()
	return cur.OpenFile(parts[len(parts)-1], unix.O_RDONLY, 0)
}

// ReadFileBeneath reads the file at rel below the directory (as
// OpenBeneath opens it), at most limit bytes; a longer file fails.
func (d *Dir) ReadFileBeneath(rel string, limit int64) ([]byte, error) {
	f, err := d.OpenBeneath(rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: longer than %d bytes", f.Name(), limit)
	}
	return b, nil
}
