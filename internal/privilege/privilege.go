// Package privilege holds cryo's rules for running as root, in one small
// place to review (the trust model is docs/security.md).
//
// Users run cryo as themselves: CRIU runs as the user (unprivileged) and
// the kernel decides what the user's processes may do. Root runs cryo for
// admin work and from a scheduler's hooks; then nothing that a user can
// change may steer root: binaries and libraries root runs or loads, and
// stores whose images root restores, must be reachable only through paths
// that root alone can change. This package says whether a path is such a
// path; it owns no other policy and touches nothing.
package privilege

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUntrusted means root was asked to use a file or directory that
// someone other than root could replace or change.
var ErrUntrusted = errors.New("not trusted as root")

// Root tells whether cryo runs as root (euid 0).
func Root() bool { return os.Geteuid() == 0 }

// Trusted checks that path, after resolving symbolic links, and every
// directory above it, are owned by root and writable by root alone. A
// directory others may write to is accepted only when it is sticky (like
// /tmp) and what lies in it on the way is root's: then no one else can
// rename or replace it. The error names the first component that fails.
func Trusted(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var child os.FileInfo
	for p := real; ; p = filepath.Dir(p) {
		fi, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if why := unsafe(fi, child); why != "" {
			where := p
			if p != real {
				where = fmt.Sprintf("%s (on the way to %s)", p, real)
			}
			return fmt.Errorf("%s %s: %w", where, why, ErrUntrusted)
		}
		if p == "/" {
			return nil
		}
		child = fi
	}
}

// unsafe says why fi (a component; child is the next one down, nil for the
// path itself) lets someone other than root change what the path names.
func unsafe(fi, child os.FileInfo) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "has no owner to check"
	}
	if st.Uid != 0 {
		return fmt.Sprintf("is owned by uid %d, not root", st.Uid)
	}
	mode := fi.Mode()
	if mode&0o022 == 0 {
		return ""
	}
	if child == nil || !fi.IsDir() {
		return fmt.Sprintf("is writable by others (mode %#o)", mode.Perm())
	}
	if mode&os.ModeSticky == 0 {
		return fmt.Sprintf("is a directory others may write to (mode %#o)", mode.Perm())
	}
	// Sticky: only its owner, the entry's owner and root may rename or
	// remove an entry; the child below is root's (checked on the way up).
	if cs, ok := child.Sys().(*syscall.Stat_t); !ok || cs.Uid != 0 {
		return "is a sticky directory others may write to, holding an entry that is not root's"
	}
	return ""
}
