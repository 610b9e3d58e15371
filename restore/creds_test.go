package restore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/creds"
	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/cryo-hpc/cryo/internal/store"
	"google.golang.org/protobuf/proto"
)

// ids are one process's credentials as a core image holds them: real,
// effective, saved and file-system uids, then gids.
type ids struct{ uid, euid, suid, fsuid, gid, egid, sgid, fsgid uint32 }

func user(uid, gid uint32) ids { return ids{uid, uid, uid, uid, gid, gid, gid, gid} }

// coreImage is a CRIU core-N.img holding a process with credentials c.
func coreImage(t *testing.T, c ids) []byte {
	t.Helper()
	core := &criucore.CoreEntry{
		Mtype: criucore.CoreEntry_X86_64.Enum(),
		Tc: &criucore.TaskCoreEntry{TaskState: proto.Uint32(1), ExitCode: proto.Uint32(0), Personality: proto.Uint32(0),
			Flags: proto.Uint32(0), BlkSigset: proto.Uint64(0), Comm: proto.String("job")},
		ThreadCore: &criucore.ThreadCoreEntry{FutexRla: proto.Uint64(0), FutexRlaLen: proto.Uint32(0),
			Creds: &creds.CredsEntry{Uid: &c.uid, Euid: &c.euid, Suid: &c.suid, Fsuid: &c.fsuid,
				Gid: &c.gid, Egid: &c.egid, Sgid: &c.sgid, Fsgid: &c.fsgid, Secbits: proto.Uint32(0)}},
	}
	msg, err := proto.Marshal(core)
	if err != nil {
		t.Fatal(err)
	}
	b := binary.LittleEndian.AppendUint32(nil, 0x54564319) // CRIU's common image magic
	b = binary.LittleEndian.AppendUint32(b, coreMagic)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(msg)))
	return append(b, msg...)
}

// credsGeneration commits a generation of a job whose processes (PIDs 100,
// 101, ...) have the credentials given, the first being the job's root.
func credsGeneration(t *testing.T, procs ...ids) (*store.Store, *store.Manifest) {
	t.Helper()
	st, err := store.Create(filepath.Join(t.TempDir(), "store"), "test")
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := st.Lock(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	w, err := st.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m := &store.Manifest{Job: store.Job{RootPID: 100}}
	var specs []store.FileSpec
	for i, c := range procs {
		pid := 100 + i
		name := fmt.Sprintf("core-%d.img", pid)
		if err := os.WriteFile(filepath.Join(dir, name), coreImage(t, c), 0o600); err != nil {
			t.Fatal(err)
		}
		specs = append(specs, store.FileSpec{Path: filepath.Join(dir, name), Name: name, Kind: "image"})
		m.Job.Processes = append(m.Job.Processes, store.Process{PID: pid, PPID: 100, Comm: "job"})
	}
	if err := w.AddFiles(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(m); err != nil {
		t.Fatal(err)
	}
	return st, m
}

// Root restores no process whose credentials differ from the job owner's
// (its root process's real ids), in any of the eight ids: a setuid or
// setgid program inside a user's job, or images crafted to hold one, would
// otherwise come back with root's (or anyone's) credentials.
func TestSameOwnerRefusesForeignCredentials(t *testing.T) {
	const u, g = 1001, 1001
	tests := []struct {
		name  string
		procs []ids
		bad   string // the process named, "" when the generation passes
	}{
		{"a user's job", []ids{user(u, g), user(u, g), user(u, g)}, ""},
		{"root's job", []ids{user(0, 0), user(0, 0)}, ""},
		{"a root process in a user's job", []ids{user(u, g), user(0, 0)}, "pid 101"},
		{"a user's process in root's job", []ids{user(0, 0), user(u, g)}, "pid 101"},
		{"a setuid-root child", []ids{user(u, g), {u, 0, 0, 0, g, g, g, g}}, "pid 101"},
		{"a setgid child", []ids{user(u, g), user(u, g), {u, u, u, u, g, 0, 0, 0}}, "pid 102"},
		{"a child with another saved uid", []ids{user(u, g), {u, u, 0, u, g, g, g, g}}, "pid 101"},
		{"a child with another file-system gid", []ids{user(u, g), {u, u, u, u, g, g, g, 0}}, "pid 101"},
		{"a job whose root is setuid-root", []ids{{u, 0, 0, 0, g, g, g, g}, user(u, g)}, "pid 100"},
		{"another user's job, consistent", []ids{user(2002, 2002), user(2002, 2002)}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, m := credsGeneration(t, tc.procs...)
			uid, gid, err := sameOwner(m, storeReader(st, m))
			if tc.bad == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if uid != int(tc.procs[0].uid) || gid != int(tc.procs[0].gid) {
					t.Errorf("owner %d:%d, want the root process's %d:%d", uid, gid, tc.procs[0].uid, tc.procs[0].gid)
				}
				return
			}
			if !errors.Is(err, ErrForeignCredentials) || !strings.Contains(err.Error(), tc.bad+" (job)") {
				t.Fatalf("got %v, want ErrForeignCredentials naming %s", err, tc.bad)
			}
		})
	}
}

// A generation without a core image for a process it lists, or with one
// that holds no credentials, is damaged, not passed.
func TestSameOwnerNeedsEveryCoreImage(t *testing.T) {
	st, m := credsGeneration(t, user(1001, 1001))
	m.Job.Processes = append(m.Job.Processes, store.Process{PID: 4242, Comm: "ghost"})
	if _, _, err := sameOwner(m, storeReader(st, m)); !errors.Is(err, store.ErrCorrupt) || !strings.Contains(err.Error(), "pid 4242") {
		t.Errorf("a process without a core image: %v, want ErrCorrupt naming it", err)
	}
}

func storeReader(st *store.Store, m *store.Manifest) imageReader {
	return func(name string, size int64) ([]byte, error) { return st.ReadAt(m, name, 0, size) }
}
