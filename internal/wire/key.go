package wire

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

const (
	minKeyLen = 32   // bytes of key, surrounding whitespace trimmed
	maxKeyLen = 4096 // likewise
	// maxKeyFile bounds what LoadKey reads: a key and some whitespace.
	maxKeyFile = 2 * maxKeyLen
)

// keyWhitespace is what LoadKey trims from both ends of a key file: ASCII
// whitespace only, so that a binary key loses no more than these bytes.
const keyWhitespace = " \t\r\n\v\f"

// LoadKey reads the pre-shared key file at path and returns the key: the
// file's contents without surrounding ASCII whitespace. The file must be
// a regular file (a symbolic link is refused: it is opened with
// O_NOFOLLOW and checked with fstat on the open descriptor, so what is
// checked is what is read), owned by the effective user, with no
// permission bits for group or others, and the key 32 to 4096 bytes long.
// Each failure is a one-line error that names the file, what is wrong
// with it and how to fix it.
func LoadKey(path string) ([]byte, error) {
	// O_NONBLOCK: opening a named pipe must not wait for a writer; it is
	// refused below as not a regular file, and has no effect on a regular
	// file's reads.
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, openError(path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close() // read only: nothing to lose on close

	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("key file %s: not a regular file but %s: name the key file itself", path, kindOf(fi.Mode()))
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, fmt.Errorf("key file %s: cannot tell who owns it on this system", path)
	}
	if euid := os.Geteuid(); int(st.Uid) != euid {
		return nil, fmt.Errorf("key file %s: owned by uid %d, not by you (uid %d): use a key file of your own, mode 600 (a copy of this one, on both nodes)", path, st.Uid, euid)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		what := "open to group or others"
		switch {
		case perm&0o044 != 0:
			what = "readable by group or others"
		case perm&0o022 != 0:
			what = "writable by group or others"
		}
		return nil, fmt.Errorf("key file %s: %s (mode %04o): chmod 600 %s", path, what, perm, path)
	}
	if fi.Size() > maxKeyFile {
		return nil, fmt.Errorf("key file %s: too long (%d bytes; a key is at most %d): name the key file itself, or make a new key with (umask 077; openssl rand -hex 32 > %s)", path, fi.Size(), maxKeyLen, path)
	}
	buf, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("key file %s: reading it: %w", path, err)
	}
	defer clear(buf)
	if len(buf) > maxKeyFile {
		return nil, fmt.Errorf("key file %s: grew past %d bytes while being read: name the key file itself", path, maxKeyFile)
	}
	key := bytes.Trim(buf, keyWhitespace)
	switch {
	case len(key) < minKeyLen:
		return nil, fmt.Errorf("key file %s: too short (%d bytes without surrounding whitespace; at least %d): make a new key with (umask 077; openssl rand -hex 32 > %s) and copy it to the other node", path, len(key), minKeyLen, path)
	case len(key) > maxKeyLen:
		return nil, fmt.Errorf("key file %s: too long (%d bytes without surrounding whitespace; at most %d): make a new key with (umask 077; openssl rand -hex 32 > %s) and copy it to the other node", path, len(key), maxKeyLen, path)
	}
	return bytes.Clone(key), nil
}

// openError explains why the key file at path could not be opened.
func openError(path string, err error) error {
	switch {
	case errors.Is(err, syscall.ELOOP):
		if fi, lerr := os.Lstat(path); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return fmt.Errorf("key file %s: a symbolic link, which is never followed: name the key file itself (%w)", path, err)
		}
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("key file %s: %w: make one with (umask 077; openssl rand -hex 32 > %s) and copy it to the other node", path, err, path)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("key file %s: %w: it must be your own file, mode 600, in a directory you can search", path, err)
	}
	return fmt.Errorf("key file %s: %w", path, err)
}

// kindOf names the type of a file that is not regular.
func kindOf(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	}
	return fmt.Sprintf("of type %v", m.Type())
}

// NewKey writes a fresh random 32-byte key, as 64 hex digits and a
// newline, to a new file at path of mode 0600 (less if the umask takes
// more away). It never overwrites or follows anything: an existing file
// or symbolic link at path is an error matching fs.ErrExist. On failure
// after the file was created, the file is removed.
func NewKey(path string) (err error) {
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return fmt.Errorf("key file %s: no random bytes for a key: %w", path, err)
	}
	text := make([]byte, hex.EncodedLen(len(raw))+1)
	hex.Encode(text, raw[:])
	text[len(text)-1] = '\n'
	clear(raw[:])
	defer clear(text)

	fd, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("key file %s: %w; a key is never overwritten: remove it first if it is to be replaced (and copy the new one to the other node)", path, err)
		}
		return fmt.Errorf("key file %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("key file %s: %w", path, cerr)
		}
		if err != nil {
			if rerr := os.Remove(path); rerr != nil {
				err = errors.Join(err, fmt.Errorf("removing the unfinished key file: %w", rerr))
			}
		}
	}()
	if _, err := f.Write(text); err != nil {
		return fmt.Errorf("key file %s: writing it: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("key file %s: syncing it: %w", path, err)
	}
	return nil
}
