package restore

import (
	"errors"
	"fmt"
	"path"

	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
	"google.golang.org/protobuf/proto"
)

// ErrForeignCredentials means a checkpoint holds a process whose
// credentials are not those of the job's owner, which root does not
// restore.
var ErrForeignCredentials = errors.New("a process with other credentials than the job's owner")

// coreMagic is CRIU's image magic of core-N.img (criu/include/magic.h).
const coreMagic = 0x55053847

// maxCoreImage bounds what is read of one core image: a few KiB are usual
// (registers, signal masks, creds), thousands of threads make them larger.
const maxCoreImage = 4 << 20

// sameOwner checks, for a restore by root, that every process of the
// generation has the credentials of the job's owner (its root process):
// real, effective, saved and file-system ids alike. Root recreates
// processes with whatever credentials the images hold; one that differs (a
// setuid program inside a user's job, a crafted image) would be a process
// the owner could not have made. Users' restores need no such check: their
// CRIU runs as them and the kernel refuses any other credentials. It
// returns the owner's uid and gid.
func sameOwner(m *store.Manifest, read imageReader) (uid, gid int, err error) {
	files := map[string]*store.File{}
	for i := range m.Files {
		files[m.Files[i].Name] = &m.Files[i]
	}
	trees := m.Job.Trees
	if len(trees) == 0 {
		trees = []string{""}
	}
	var owner *[2]uint32
	var ownerPID int
	for _, p := range m.Job.Processes {
		var (
			f    *store.File
			name string
		)
		for _, t := range trees {
			name = path.Join(t, fmt.Sprintf("core-%d.img", p.PID))
			if f = files[name]; f != nil {
				break
			}
		}
		if f == nil {
			return 0, 0, fmt.Errorf("%w: generation holds no core image for pid %d", store.ErrCorrupt, p.PID)
		}
		if f.Size > maxCoreImage {
			return 0, 0, fmt.Errorf("%w: %s is %d bytes", store.ErrCorrupt, name, f.Size)
		}
		b, err := read(name, f.Size)
		if err != nil {
			return 0, 0, err
		}
		msgs, err := pageserver.ImageEntries(b, coreMagic)
		if err != nil || len(msgs) == 0 {
			return 0, 0, fmt.Errorf("%w: %s: %v", store.ErrCorrupt, name, err)
		}
		var core criucore.CoreEntry
		if err := proto.Unmarshal(msgs[0], &core); err != nil {
			return 0, 0, fmt.Errorf("%w: %s: %v", store.ErrCorrupt, name, err)
		}
		c := core.GetThreadCore().GetCreds()
		if c == nil {
			return 0, 0, fmt.Errorf("%w: %s holds no credentials", store.ErrCorrupt, name)
		}
		uids := []uint32{c.GetUid(), c.GetEuid(), c.GetSuid(), c.GetFsuid()}
		gids := []uint32{c.GetGid(), c.GetEgid(), c.GetSgid(), c.GetFsgid()}
		if owner == nil {
			owner, ownerPID = &[2]uint32{uids[0], gids[0]}, p.PID
		}
		for i := range uids {
			if uids[i] != owner[0] || gids[i] != owner[1] {
				return 0, 0, fmt.Errorf("pid %d (%s) has uids %v and gids %v, but the job's owner (pid %d) is uid %d gid %d: root does not restore %w",
					p.PID, p.Comm, uids, gids, ownerPID, owner[0], owner[1], ErrForeignCredentials)
			}
		}
	}
	if owner == nil {
		return 0, 0, fmt.Errorf("%w: the generation lists no process", store.ErrCorrupt)
	}
	return int(owner[0]), int(owner[1]), nil
}
