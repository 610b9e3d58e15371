package checkpoint

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/tmpfs"
)

// tmpfsFiles saves, with a checkpoint of a job that is not in namespaces
// of its own, the contents of the tmpfs files it maps or holds open (its
// POSIX shared memory in /dev/shm, an MPI library's session files), which
// CRIU reopens by path at restore but does not save (see internal/tmpfs).
// A job in namespaces of its own has a private /dev/shm and TMPDIR whose
// contents CRIU saves with its mount namespace: it gets no record.
type tmpfsFiles struct {
	found []tmpfs.Found
	dir   string // where the contents are copied while the job is frozen
	saved *tmpfs.Saved
	err   error
}

// scanTmpfs finds the job's tmpfs files before the dump, and refuses a
// job with more than a checkpoint saves (tmpfs.ErrTooMuch) before anything
// is dumped. It returns nil when there is nothing to save.
func scanTmpfs(o Options) (*tmpfsFiles, error) {
	if ownPIDNamespace(o.PID) {
		return nil, nil
	}
	t, err := proc.All()
	if err != nil {
		return nil, err
	}
	found, err := tmpfs.Scan(proc.Descendants(t, append([]int{o.PID}, o.MorePIDs...)...))
	if err != nil || len(found) == 0 {
		return nil, err
	}
	return &tmpfsFiles{found: found}, nil
}

// ownPIDNamespace tells whether pid is the init of a PID namespace of its
// own (cryo run's job-init with namespaces), as a restore tells from the
// images (its root is PID 1 there).
func ownPIDNamespace(pid int) bool {
	ids, err := proc.NSpid(pid)
	return err == nil && len(ids) > 1 && ids[len(ids)-1] == 1
}

// bytes is how much the copies take.
func (t *tmpfsFiles) bytes() int64 {
	if t == nil {
		return 0
	}
	var n int64
	for _, f := range t.found {
		n += f.Size
	}
	return n
}

// prepare makes the directory the copies go to, in the work directory.
func (t *tmpfsFiles) prepare(work string) error {
	if t == nil {
		return nil
	}
	t.dir = filepath.Join(work, "tmpfs-files")
	return os.Mkdir(t.dir, 0o700)
}

// frozen copies the files' contents; the dump calls it while the job is
// frozen (CRIU's post-dump point, or before several trees are thawed). An
// error fails the dump, and CRIU lets the job run on.
func (t *tmpfsFiles) frozen() error {
	if t == nil {
		return nil
	}
	t.saved, t.err = tmpfs.Save(t.found, t.dir)
	return t.err
}

// specs seals the record (digests, once the job runs again) and lists it
// and the copies as files of the generation ("log" files: CRIU is not
// given them; a restore reads them before CRIU runs).
func (t *tmpfsFiles) specs(work string, log *slog.Logger) ([]store.FileSpec, int, error) {
	if t == nil {
		return nil, 0, nil
	}
	if t.saved == nil {
		return nil, 0, fmt.Errorf("the job's tmpfs files were never saved (the dump reached no frozen point)")
	}
	for _, s := range t.saved.Skipped {
		log.Warn("a tmpfs file of the job was not saved", "file", s)
	}
	rec, err := t.saved.Seal()
	if err != nil {
		return nil, 0, fmt.Errorf("the job's tmpfs files: %w", err)
	}
	if len(rec.Files) == 0 {
		return nil, 0, nil
	}
	b, err := tmpfs.Encode(rec)
	if err != nil {
		return nil, 0, err
	}
	p := filepath.Join(work, tmpfs.RecordName)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		return nil, 0, err
	}
	specs := []store.FileSpec{{Path: p, Name: tmpfs.RecordName, Kind: "log"}}
	for i, f := range rec.Files {
		for k := 0; k < tmpfs.Parts(f.Size); k++ {
			specs = append(specs, store.FileSpec{Path: t.saved.PartPath(i, k), Name: tmpfs.DataName(i, k), Kind: "log"})
		}
		log.Debug("tmpfs file saved", "file", f.Path, "bytes", f.Size)
	}
	return specs, len(rec.Files), nil
}
