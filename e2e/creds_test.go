package e2e

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
	"google.golang.org/protobuf/proto"
)

// Processes with other credentials than the job owner's: a user's cryo
// refuses to checkpoint them (its CRIU could not seize them, nor give them
// those credentials back), and root refuses to restore them.

// sleeper starts `sleep 300` in a session of its own with cred (nil: as
// root), and kills it at the end of the test.
func sleeper(t *testing.T, cred *syscall.Credential) int {
	t.Helper()
	cmd := exec.Command("/bin/sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid
}

// TestUserRefusesOtherCredentials: a user's `cryo checkpoint --kill` of a
// process they may not checkpoint (root's, or their own running with
// another group, as a setgid program does) fails before anything is
// dumped: exit 1, one line naming the process, the credential and what to
// do; no generation; the process runs on, neither killed nor stopped.
func TestUserRefusesOtherCredentials(t *testing.T) {
	criu, u := requireUser(t)
	const nogroup = 65534
	cases := []struct {
		name string
		cred *syscall.Credential
		says string // the credential named
	}{
		{"root's process", nil, fmt.Sprintf("runs as uid 0, not as you (uid %d)", u.uid)},
		{"the user's process with another group", &syscall.Credential{Uid: uint32(u.uid), Gid: nogroup, Groups: []uint32{uint32(u.gid)}},
			fmt.Sprintf("runs with gid %d, not your gid %d", nogroup, u.gid)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pid := sleeper(t, tc.cred)
			st := filepath.Join(u.dir(t), "store")
			r := u.cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(pid))
			if r.code != 1 {
				t.Fatalf("a user's checkpoint of %s: want exit 1\n%s", tc.name, r)
			}
			msg := strings.TrimSpace(r.stderr)
			if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, fmt.Sprintf("pid %d (sleep)", pid)) ||
				!strings.Contains(msg, tc.says) || !strings.Contains(msg, "admin") {
				t.Errorf("want one line naming pid %d, %q and what to do; got:\n%s", pid, tc.says, msg)
			}
			if ents, err := os.ReadDir(filepath.Join(st, "checkpoints")); len(ents) != 0 {
				t.Errorf("a refused checkpoint left %d generations (%v)", len(ents), err)
			}
			time.Sleep(100 * time.Millisecond)
			if s := procState(pid); s != 'S' && s != 'R' {
				t.Errorf("the process whose checkpoint was refused is in state %q, want running", s)
			}
		})
	}
}

// TestRootRefusesForeignCredentials: root's store holds a generation of a
// job whose owner (its root process) is the test user and whose child runs
// as root: what a user's job running a setuid-root program gives, or images
// made to look so. (It is made here by rewriting the credentials in the
// core images of a root job's checkpoint: on these machines root's CRIU
// cannot dump another user's processes, lacking CAP_SYS_RESOURCE.) CRIU as
// root would recreate both, a root process under the user's; root refuses
// (restore.ErrForeignCredentials) before CRIU runs, and nothing of the job
// comes back.
func TestRootRefusesForeignCredentials(t *testing.T) {
	criu, u := requireUser(t)
	rd := rootDir(t)
	marker := filepath.Join(rd, "job") // names the job's processes
	cmd := exec.Command("/bin/bash", "-c", "exec -a "+marker+" /bin/sh -c 'sleep 300 & wait'")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Reaped as soon as it ends, so that its PID is free for a restore.
	reaped := make(chan struct{})
	go func() { cmd.Wait(); close(reaped) }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); <-reaped })
	var pids []int
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids, _ = proc.Tree(cmd.Process.Pid)
		if len(pids) == 2 {
			if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pids[1])); strings.HasSuffix(exe, "/sleep") {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the job never started its child: %v", pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
	st := filepath.Join(rd, "store")
	if r := cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(pids[0])); r.code != 0 {
		t.Fatalf("root's checkpoint of its job: %s", r)
	}
	<-reaped
	waitEnded(t, 10*time.Second, pids...)
	forgeCreds(t, st, pids[0], uint32(u.uid), uint32(u.gid))

	r := cryo(t, criu, "restore", "--store", st)
	if r.code != 1 || !strings.Contains(r.stderr, "root does not restore a process with other credentials") ||
		!strings.Contains(r.stderr, fmt.Sprintf("pid %d (sleep)", pids[1])) {
		t.Errorf("root's restore of a user's job holding a root process: want exit 1 naming pid %d and refusing it\n%s", pids[1], r)
	}
	if strings.TrimSpace(r.stdout) != "" {
		t.Errorf("a refused restore printed %q", r.stdout)
	}
	time.Sleep(200 * time.Millisecond)
	tab, err := proc.All()
	if err != nil {
		t.Fatal(err)
	}
	for p := range tab {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); err == nil && strings.Contains(string(b), marker) {
			syscall.Kill(p, syscall.SIGKILL)
			t.Errorf("pid %d of the job (%q) runs again after root refused to restore it", p, b)
		}
		if p == pids[1] && alive(p) {
			if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", p)); strings.HasSuffix(exe, "/sleep") {
				syscall.Kill(p, syscall.SIGKILL)
				t.Errorf("the job's root child (pid %d) runs again after root refused to restore it", p)
			}
		}
	}
}

// forgeCreds commits a new generation of the store that is its newest
// with the credentials of process pid rewritten to uid and gid in its core
// image (all eight ids): what an attacker able to write images would do,
// with everything else as CRIU dumped it.
func forgeCreds(t *testing.T, dir string, pid int, uid, gid uint32) {
	t.Helper()
	ctx := t.Context()
	s, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := s.Lock(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	gens, err := s.Generations()
	if err != nil || len(gens) == 0 {
		t.Fatalf("generations: %v %v", gens, err)
	}
	m, err := s.ReadManifest(gens[len(gens)-1])
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	if err := s.Materialize(ctx, m, tmp, "image", "pages", "log"); err != nil {
		t.Fatal(err)
	}
	core := filepath.Join(tmp, fmt.Sprintf("core-%d.img", pid))
	b, err := os.ReadFile(core)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := pageserver.ImageEntries(b, 0x55053847) // core-N.img
	if err != nil || len(msgs) == 0 {
		t.Fatalf("%s: %v", core, err)
	}
	var ce criucore.CoreEntry
	if err := proto.Unmarshal(msgs[0], &ce); err != nil {
		t.Fatal(err)
	}
	c := ce.GetThreadCore().GetCreds()
	if c == nil {
		t.Fatalf("%s holds no credentials", core)
	}
	c.Uid, c.Euid, c.Suid, c.Fsuid = &uid, &uid, &uid, &uid
	c.Gid, c.Egid, c.Sgid, c.Fsgid = &gid, &gid, &gid, &gid
	msg, err := proto.Marshal(&ce)
	if err != nil {
		t.Fatal(err)
	}
	out := append([]byte(nil), b[:8]...) // the magics
	for _, m := range append([][]byte{msg}, msgs[1:]...) {
		out = binary.LittleEndian.AppendUint32(out, uint32(len(m)))
		out = append(out, m...)
	}
	if err := os.WriteFile(core, out, 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	var specs []store.FileSpec
	for _, f := range m.Files {
		specs = append(specs, store.FileSpec{Path: filepath.Join(tmp, f.Name), Name: f.Name, Kind: f.Kind})
	}
	if err := w.AddFiles(ctx, specs); err != nil {
		t.Fatal(err)
	}
	forged := &store.Manifest{Host: m.Host, CreatedBy: m.CreatedBy, Job: m.Job, CRIU: m.CRIU, Offload: m.Offload}
	if _, err := w.Commit(forged); err != nil {
		t.Fatal(err)
	}
}
