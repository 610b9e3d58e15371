package criu

import (
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
)

// RegFile is a regular file some process of a dumped tree had open, as
// files.img records it.
type RegFile struct {
	Name  string // path, as CRIU saw it
	Flags uint32 // open flags (O_WRONLY, O_APPEND, ...)
	Pos   uint64 // file position at the dump
	// Size is the file's size at the dump, which CRIU records (HasSize)
	// for every file but those opened write-only with O_APPEND.
	Size    uint64
	HasSize bool
}

// ReadRegFiles lists the regular files of the tree imaged in dir.
func ReadRegFiles(dir string) ([]RegFile, error) {
	img, err := decode(filepath.Join(dir, "files.img"), &fdinfo.FileEntry{})
	if err != nil {
		return nil, err
	}
	var out []RegFile
	for _, e := range img.Entries {
		f := e.Message.(*fdinfo.FileEntry)
		r := f.GetReg()
		if f.GetType() != fdinfo.FdTypes_REG || r == nil {
			continue
		}
		out = append(out, RegFile{Name: r.GetName(), Flags: r.GetFlags(), Pos: r.GetPos(), Size: r.GetSize(), HasSize: r.Size != nil})
	}
	return out, nil
}
