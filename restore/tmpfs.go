package restore

import (
	"fmt"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/tmpfs"
)

// recreateTmpfs brings back the tmpfs files (POSIX shared memory, an MPI
// library's session files) of a job that was not in namespaces of its
// own, as they were at the checkpoint, where they are missing or differ
// (see internal/tmpfs): the job's memory goes with those contents, and
// CRIU reopens the files by path. It runs once the job's old processes are
// gone and before CRIU. The files are made and opened as the job's owner
// (uid, gid): as root, with the owner's file-system identity
// (privilege.AsUser), so that root creates nothing by path in a directory
// a user can write; as a user, as themselves. Only the owner's files are
// brought back; others' that are missing or changed are returned in left.
// A generation without a record (a job in namespaces of its own, whose
// tmpfs CRIU restores itself, or without tmpfs files) does nothing. A file
// of the owner's that cannot be brought back fails the restore; that
// recurs (criu.ErrRecurring) until something at its path changes.
func recreateTmpfs(m *store.Manifest, read imageReader, uid, gid int, asRoot bool) (done []tmpfs.Outcome, left []string, err error) {
	var size int64 = -1
	for _, f := range m.Files {
		if f.Name == tmpfs.RecordName {
			size = f.Size
		}
	}
	if size < 0 {
		return nil, nil, nil
	}
	if size > tmpfs.MaxRecord {
		return nil, nil, fmt.Errorf("%w: %s is %d bytes, more than a record can be", store.ErrCorrupt, tmpfs.RecordName, size)
	}
	b, err := read(tmpfs.RecordName, size)
	if err != nil {
		return nil, nil, err
	}
	rec, err := tmpfs.Decode(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", store.ErrCorrupt, err)
	}
	o := tmpfs.Options{UID: uid, Read: func(name string, n int64) ([]byte, error) { return read(name, n) }}
	if asRoot {
		o.AsOwner = func(fn func() error) error { return privilege.AsUser(uid, gid, fn) }
	}
	done, left, err = tmpfs.Recreate(rec, o)
	if err != nil {
		return done, left, fmt.Errorf("the job's tmpfs files cannot be brought back as they were at the checkpoint: %w (%w)", err, criu.ErrRecurring)
	}
	return done, left, nil
}
