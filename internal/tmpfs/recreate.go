package tmpfs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/cryo-hpc/cryo/internal/safefs"
	"golang.org/x/sys/unix"
)

// Options say for whom and from where Recreate works.
type Options struct {
	// UID is the job's owner: the uid its processes are restored with.
	// Only files and directories recorded as the owner's are created or
	// changed, and what is created is the owner's, with the group of the
	// owner's file-system identity (AsOwner's, or the caller's).
	UID int
	// AsOwner runs fn with the owner's file-system identity (for root:
	// privilege.AsUser): every lookup, creation and open of a file happens
	// in it, so that the kernel decides as it would for the owner. nil
	// runs fn as the caller, who must be the owner.
	AsOwner func(fn func() error) error
	// Read returns part name of the generation, size bytes (at most
	// PartSize), verified.
	Read func(name string, size int64) ([]byte, error)
}

// Outcome is what Recreate did to one file.
type Outcome struct {
	Path   string `json:"path"`
	Action string `json:"action"` // "created" or "replaced"
	Size   int64  `json:"size"`
}

func (o Outcome) String() string { return fmt.Sprintf("%s %s (%d bytes)", o.Action, o.Path, o.Size) }

// ErrNotOwners means a file or directory of the record, or what is at its
// path now, is not the job owner's, and so is not made or changed.
var ErrNotOwners = errors.New("not the job owner's")

// Recreate brings back each file of rec that is missing or differs from
// the checkpoint (contents, size, permissions) at its path, creating
// missing directories on the way that the record has. It acts only on
// files and directories the record says are the owner's and that are the
// owner's now, never follows a symbolic link (every path is walked from
// the root through directory descriptors, one component at a time), and
// replaces contents in place. A file held only for appending is recreated
// when missing and otherwise left alone. Call it when no process of the
// job runs.
//
// It returns what it did; in left, the files of others (the record says
// so) that are missing or changed, which are not its to bring back (CRIU
// will find them as they are); and an error naming each of the owner's
// files it could not bring back (with ErrNotOwners when what is in its
// place is someone else's).
func Recreate(rec *Record, o Options) (done []Outcome, left []string, err error) {
	if o.AsOwner == nil {
		o.AsOwner = func(fn func() error) error { return fn() }
	}
	dirs := map[string]Dir{}
	for _, d := range rec.Dirs {
		dirs[d.Path] = d
	}
	var errs []error
	for i, f := range rec.Files {
		out, err := o.recreate(i, f, dirs)
		err = bare(err)
		var fe *foreignError
		switch {
		case errors.As(err, &fe), errors.Is(err, ErrNotOwners) && !o.owns(f.UID):
			left = append(left, fmt.Sprintf("%s: %v", f.Path, err))
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", f.Path, err))
		case out != nil:
			done = append(done, *out)
		}
	}
	return done, left, errors.Join(errs...)
}

// bare drops the path safefs puts in its errors (the caller names the
// file), keeping what went wrong.
func bare(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return err
}

// foreignError is a file of someone else's (by the record) that is missing
// or changed: left alone, not an error of the restore.
type foreignError struct{ msg string }

func (e *foreignError) Error() string { return e.msg }

func (o Options) owns(uid uint32) bool { return int(uid) == o.UID }

// recreate brings back file i of the record, f, if it needs to be.
func (o Options) recreate(i int, f File, dirs map[string]Dir) (*Outcome, error) {
	var (
		cur     *os.File // the file at the path, for reading
		created bool
		out     *os.File // where the contents go
	)
	defer func() {
		for _, c := range []*os.File{cur, out} {
			if c != nil {
				c.Close()
			}
		}
	}()
	err := o.AsOwner(func() error {
		parent, err := o.walk(filepath.Dir(f.Path), dirs)
		if err != nil {
			return err
		}
		defer parent.Close()
		name := filepath.Base(f.Path)
		cur, err = parent.OpenFile(name, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
		if errors.Is(err, unix.ELOOP) {
			return errors.New("a symbolic link is in its place, and links are never followed")
		}
		if errors.Is(err, os.ErrPermission) {
			// Say whose it is, if that is why.
			var st unix.Stat_t
			if unix.Fstatat(parent.Fd(), name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && int(st.Uid) != o.UID {
				return fmt.Errorf("the file in its place is uid %d's, not the job owner's: %w", st.Uid, ErrNotOwners)
			}
		}
		if errors.Is(err, os.ErrNotExist) {
			if !o.owns(f.UID) {
				return &foreignError{fmt.Sprintf("missing, and uid %d's at the checkpoint, not the job owner's", f.UID)}
			}
			out, err = parent.OpenFile(name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOCTTY, 0o600)
			created = err == nil
			return err
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if cur != nil {
		same, err := matches(cur, f)
		if err != nil || same || f.AppendOnly {
			return nil, err
		}
		if !o.owns(f.UID) {
			return nil, &foreignError{fmt.Sprintf("changed since the checkpoint, and uid %d's, not the job owner's", f.UID)}
		}
		// The owner's, and not what the job left: replaced in place,
		// opened again as the owner (it may need the owner's write bit
		// first: the owner may set that).
		var st unix.Stat_t
		if err := unix.Fstat(int(cur.Fd()), &st); err != nil {
			return nil, err
		}
		if err := o.AsOwner(func() error {
			if st.Mode&0o200 == 0 {
				if err := unix.Fchmod(int(cur.Fd()), st.Mode&0o7777|0o200); err != nil {
					return err
				}
			}
			parent, err := o.walk(filepath.Dir(f.Path), dirs)
			if err != nil {
				return err
			}
			defer parent.Close()
			out, err = parent.OpenFile(filepath.Base(f.Path), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
			if err != nil {
				return err
			}
			// The same file as the one compared, or another one put there
			// meanwhile: only the former.
			var now unix.Stat_t
			if err := unix.Fstat(int(out.Fd()), &now); err != nil {
				return err
			}
			if now.Dev != st.Dev || now.Ino != st.Ino {
				return errors.New("replaced while being restored")
			}
			return nil
		}); err != nil {
			return nil, err
		}
	}
	if err := o.fill(out, i, f); err != nil {
		return nil, err
	}
	action := "replaced"
	if created {
		action = "created"
	}
	return &Outcome{Path: f.Path, Action: action, Size: f.Size}, nil
}

// walk opens the directory at path from the root, one component at a
// time, never following a link, creating missing directories that the
// record has as the owner's (with their mode). It runs as the owner.
func (o Options) walk(path string, dirs map[string]Dir) (*safefs.Dir, error) {
	d, err := safefs.OpenDir("/")
	if err != nil {
		return nil, err
	}
	at := "/"
	for _, c := range strings.Split(strings.TrimPrefix(path, "/"), "/") {
		if c == "" {
			continue
		}
		at = filepath.Join(at, c)
		sub, err := d.Open(c)
		if errors.Is(err, os.ErrNotExist) {
			rd, ok := dirs[at]
			if !ok || !o.owns(rd.UID) {
				d.Close()
				return nil, fmt.Errorf("directory %s is missing, and not the job owner's to create: %w", at, ErrNotOwners)
			}
			if sub, _, err = d.Mkdir(c, 0o700); err == nil {
				err = sub.Chmod(rd.Mode & 0o1777)
			}
		}
		d.Close()
		if err != nil {
			if sub != nil {
				sub.Close()
			}
			if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				return nil, fmt.Errorf("%s is not a directory (a link is never followed): %w", at, bare(err))
			}
			return nil, err
		}
		d = sub
	}
	return d, nil
}

// matches tells whether the open file cur is the checkpoint's f: a regular
// file of the same owner, size, contents and permissions.
func matches(cur *os.File, f File) (bool, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(cur.Fd()), &st); err != nil {
		return false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, fmt.Errorf("a %s is in its place, not a regular file", kind(st.Mode))
	}
	if st.Uid != f.UID && !f.AppendOnly {
		// Someone else's file where the job's was: the job would map it.
		return false, fmt.Errorf("the file in its place is uid %d's, not uid %d's as at the checkpoint: %w", st.Uid, f.UID, ErrNotOwners)
	}
	if st.Size != f.Size || st.Mode&0o777 != f.Mode&0o777 {
		return false, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(cur, 0, f.Size)); err != nil {
		return false, err
	}
	return hex.EncodeToString(h.Sum(nil)) == f.SHA256, nil
}

func kind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symbolic link"
	case unix.S_IFIFO:
		return "FIFO"
	case unix.S_IFSOCK:
		return "socket"
	default:
		return "special file"
	}
}

// fill writes the checkpoint's contents of file i into out, cuts it to
// its size, and gives it its permissions (no set-id bits: the file is
// the owner's data, made as the owner); the contents are checked against
// the record's digest as they are written.
func (o Options) fill(out *os.File, i int, f File) error {
	h := sha256.New()
	var off int64
	for k := 0; k < Parts(f.Size); k++ {
		n := min(int64(PartSize), f.Size-off)
		b, err := o.Read(DataName(i, k), n)
		if err != nil {
			return err
		}
		if int64(len(b)) != n {
			return fmt.Errorf("%s holds %d bytes, want %d", DataName(i, k), len(b), n)
		}
		h.Write(b)
		if _, err := out.WriteAt(b, off); err != nil {
			return err
		}
		off += n
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != f.SHA256 {
		return fmt.Errorf("the saved contents have digest %s, the record says %s", got, f.SHA256)
	}
	if err := out.Truncate(f.Size); err != nil {
		return err
	}
	return unix.Fchmod(int(out.Fd()), f.Mode&0o777)
}
