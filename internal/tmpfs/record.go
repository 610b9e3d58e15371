package tmpfs

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

const (
	// RecordName is the file of a generation that holds the Record.
	RecordName = "tmpfs-files.json"
	// PartSize is the most of a file's contents one part holds: parts are
	// generation files, which a reader takes into memory whole.
	PartSize = 16 << 20
	// MaxFiles and MaxBytes bound what a checkpoint saves: the number of
	// files, and their contents together. A job past them is refused
	// (ErrTooMuch) before anything is dumped.
	MaxFiles = 4096
	MaxBytes = 4 << 30
	// MaxRecord bounds the record read from a generation.
	MaxRecord = 16 << 20

	maxDirs = 8 * MaxFiles
	maxPath = 4096
)

// The bounds Scan and Save apply (tests lower them).
var maxFiles, maxBytes int64 = MaxFiles, MaxBytes

// ErrTooMuch means the job's tmpfs files are more than a checkpoint saves.
var ErrTooMuch = errors.New("more tmpfs files than a checkpoint saves")

// ErrBadRecord means a record read from a generation is malformed.
var ErrBadRecord = errors.New("bad tmpfs record")

// File is a regular file on a tmpfs that the job uses.
type File struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode"` // permission bits
	UID  uint32 `json:"uid"`
	GID  uint32 `json:"gid"`
	Size int64  `json:"size"`
	// SHA256 is the digest of the contents (Seal).
	SHA256 string `json:"sha256"`
	// AppendOnly says the job holds it only for appending, as an output:
	// a restore recreates it when it is missing and otherwise leaves it
	// (cutting outputs back is internal/outputs' business).
	AppendOnly bool `json:"append_only,omitempty"`
}

// Dir is a directory on the way to a file, below its tmpfs's root: one a
// restore may have to create again (an MPI launcher removes its session
// directory with the files in it).
type Dir struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode"`
	UID  uint32 `json:"uid"`
	GID  uint32 `json:"gid"`
}

// Record is what a generation keeps of the job's tmpfs files.
type Record struct {
	Files []File `json:"files"`
	Dirs  []Dir  `json:"dirs,omitempty"`
}

// Bytes is the size of all files together.
func (r *Record) Bytes() int64 {
	var n int64
	for _, f := range r.Files {
		n += f.Size
	}
	return n
}

// Parts is the number of parts that hold a file of size bytes.
func Parts(size int64) int { return int((size + PartSize - 1) / PartSize) }

// DataName names part k of the contents of the record's file i in the
// generation.
func DataName(i, k int) string { return fmt.Sprintf("tmpfs-files/%d.%d", i, k) }

// Encode is the record's form in a generation.
func Encode(r *Record) ([]byte, error) { return json.MarshalIndent(r, "", " ") }

// Decode reads a record written by Encode and checks that it says what a
// record can: bounded counts and sizes, absolute clean paths, each once,
// permission bits and digests of the right form. b must already be
// bounded (MaxRecord).
func Decode(b []byte) (*Record, error) {
	if len(b) > MaxRecord {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadRecord, len(b))
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	return &r, nil
}

func (r *Record) validate() error {
	if len(r.Files) > MaxFiles || len(r.Dirs) > maxDirs {
		return fmt.Errorf("%d files and %d directories", len(r.Files), len(r.Dirs))
	}
	seen := map[string]bool{}
	var total int64
	for _, f := range r.Files {
		if err := checkPath(f.Path); err != nil {
			return err
		}
		if seen[f.Path] {
			return fmt.Errorf("%.200q is listed twice", f.Path)
		}
		seen[f.Path] = true
		if f.Mode&^0o7777 != 0 || f.Size < 0 || f.Size > MaxBytes {
			return fmt.Errorf("%.200q: mode %#o, %d bytes", f.Path, f.Mode, f.Size)
		}
		if total += f.Size; total > MaxBytes {
			return fmt.Errorf("%d bytes in all", total)
		}
		if d, err := hex.DecodeString(f.SHA256); err != nil || len(d) != 32 {
			return fmt.Errorf("%.200q: digest %.80q", f.Path, f.SHA256)
		}
	}
	for _, d := range r.Dirs {
		if err := checkPath(d.Path); err != nil {
			return err
		}
		if seen[d.Path] {
			return fmt.Errorf("%.200q is listed twice", d.Path)
		}
		seen[d.Path] = true
		if d.Mode&^0o7777 != 0 {
			return fmt.Errorf("%.200q: mode %#o", d.Path, d.Mode)
		}
	}
	return nil
}

// checkPath accepts an absolute, clean path below the root, of printable
// characters.
func checkPath(p string) error {
	if len(p) > maxPath || !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" ||
		strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("path %.200q", p)
	}
	return nil
}
