package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// The security suite: each attack of issue 11, as a user who is not root
// would try it on a node where root runs cryo, and the assertion that it
// fails: no process with other credentials than the user's, no file
// created, changed or removed outside the store, no foreign process
// signalled. (The store's own link and bounds attacks are tested where they
// are stopped, in internal/store; the PID holders in runfail_test.go.)

// rootTarget is a file (of root's, unless made by newTarget) that an
// attack tries to change, with what it holds and when it last changed.
type rootTarget struct {
	path  string
	data  []byte
	mtime time.Time
}

func newRootTarget(t *testing.T, dir, name string) rootTarget {
	t.Helper()
	return newTarget(t, dir, name, 0, 0)
}

// newTarget is a file that an attack tries to change, owned by uid:gid and
// writable by its owner alone.
func newTarget(t *testing.T, dir, name string, uid, gid int) rootTarget {
	t.Helper()
	p := filepath.Join(dir, name)
	data := []byte("the owner's own data\n")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, uid, gid); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	return rootTarget{path: p, data: data, mtime: fi.ModTime()}
}

// intact fails the test if the attack changed the target.
func (r rootTarget) intact(t *testing.T, attack string) {
	t.Helper()
	b, err := os.ReadFile(r.path)
	fi, serr := os.Stat(r.path)
	if err != nil || serr != nil || !bytes.Equal(b, r.data) || !fi.ModTime().Equal(r.mtime) {
		t.Errorf("%s changed %s: %q (%v)", attack, r.path, b, err)
	}
}

// rootDir is a directory of root's the user may enter but not write, for
// files an attack must not touch.
func rootDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "cryo-root-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// userStore is a store the user made by checkpointing a job of theirs.
func userStore(t *testing.T, criu string, u testUser) (dir, st string) {
	t.Helper()
	dir = u.dir(t)
	st = filepath.Join(dir, "store")
	j := u.startJob(t, "memstate", filepath.Join(dir, "job.out"), "-steps", "400", "-mem", "1", "-delay", "50ms")
	waitStep(t, filepath.Join(dir, "job.out"), 2, 30*time.Second)
	if r := u.cryo(t, criu, "checkpoint", "--store", st, strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("the user's own checkpoint: %s", r)
	}
	j.killTree(t)
	return dir, st
}

// Attack 1: a store the user prepared (images of their choosing, a run
// state saying "stopped") is worked on by root. Root refuses every store it
// does not alone control, before reading anything from it: nothing of the
// store is restored, checkpointed into, collected or run.
func TestSecurityRootRefusesAUsersStore(t *testing.T) {
	criu, u := requireUser(t)
	dir, st := userStore(t, criu, u)
	if err := os.WriteFile(filepath.Join(st, "run-state-planted"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	victim := startJob(t, "memstate", filepath.Join(rootDir(t), "victim.out"), false, "-steps", "400", "-mem", "1", "-delay", "50ms")
	for _, args := range [][]string{
		{"restore", "--store", st},
		{"checkpoint", "--store", st, "--leave-running", strconv.Itoa(victim.pid)},
		{"gc", "--store", st},
		{"recover", "--store", st},
		{"run", "--store", st, "--", "/bin/true"},
	} {
		r := cryo(t, criu, args...)
		if r.code != 1 || !strings.Contains(r.stderr, "root alone can change") {
			t.Errorf("as root, cryo %s on a user's store: want exit 1 refusing it\n%s", args[0], r)
		}
		if args[0] == "restore" && strings.TrimSpace(r.stdout) != "" {
			t.Errorf("as root, a restore from a user's store printed %q", r.stdout)
		}
	}
	if victim.exited() {
		t.Error("root's job died when root refused to checkpoint it into a user's store")
	}
	if ents, _ := os.ReadDir(filepath.Join(st, "checkpoints")); len(ents) != 1 {
		t.Errorf("the user's store has %d generations after root's refusals, want its own 1", len(ents))
	}
	for _, p := range []string{dir, st} {
		var s syscall.Stat_t
		if err := syscall.Stat(p, &s); err != nil || int(s.Uid) != u.uid {
			t.Errorf("%s is no longer the user's (uid %d)", p, s.Uid)
		}
	}
}

// Attack 1, the other way: images of a root process handed to a user. The
// user's CRIU runs as the user and cannot give a process root's
// credentials; nothing runs as root.
func TestSecurityUserCannotRestoreRootImages(t *testing.T) {
	criu, u := requireUser(t)
	root := rootDir(t)
	rst := filepath.Join(root, "store")
	j := startJob(t, "memstate", filepath.Join(root, "job.out"), false, "-steps", "400", "-mem", "1", "-delay", "50ms")
	waitStep(t, filepath.Join(root, "job.out"), 2, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", rst, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("root's checkpoint of its own job: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	dir := u.dir(t)
	ust := filepath.Join(dir, "store")
	cp := exec.Command("cp", "-a", rst, ust)
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("copy: %v %s", err, out)
	}
	if out, err := exec.Command("chown", "-R", fmt.Sprintf("%d:%d", u.uid, u.gid), ust).CombinedOutput(); err != nil {
		t.Fatalf("chown: %v %s", err, out)
	}
	// The job's output file must be writable for CRIU to get as far as
	// the credentials.
	if err := os.Chmod(filepath.Join(root, "job.out"), 0o666); err != nil {
		t.Fatal(err)
	}
	r := u.cryo(t, criu, "restore", "--store", ust)
	if r.code == 0 {
		pid, _ := strconv.Atoi(strings.TrimSpace(r.stdout))
		if pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		t.Fatalf("a user restored root's images: %s", r)
	}
	for _, p := range allMemstates(t) {
		if st := readUserProcess(t, p); strings.HasPrefix(st.uids, "0 ") {
			syscall.Kill(p, syscall.SIGKILL)
			t.Errorf("a process with root's credentials (pid %d) came from the user's restore", p)
		}
	}
}

func allMemstates(t *testing.T) []int {
	t.Helper()
	tab, err := proc.All()
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for pid := range tab {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && exe == bin("memstate") {
			out = append(out, pid)
		}
	}
	return out
}

// Attack 2: the job replaces the files cryo writes in its run directory
// (events, the state's temporary file, job-init's log, its output, the
// heartbeat) with links, and then fails so that cryo starts it again.
// The links point at files of the same user outside the store, so that
// following one would succeed (the kernel would allow the write): only
// cryo's refusal to follow links keeps them unchanged. (Links to root's
// files prove nothing here: the user's cryo could not write them anyway.)
func TestSecurityRunDirectoryLinks(t *testing.T) {
	criu, u := requireUser(t)
	dir := u.dir(t)
	outside := filepath.Join(dir, "outside")
	mkdirAs(t, u, outside)
	target := newTarget(t, outside, "target", u.uid, u.gid)
	// The heartbeat is only created, never written: a link to a missing
	// file would make a follower create it.
	missing := filepath.Join(outside, "missing")
	st := filepath.Join(dir, "store")
	run := filepath.Join(st, "run")
	script := fmt.Sprintf(`if [ ! -e %[1]s/planted ]; then
  for f in events.jsonl state.json.tmp init.log host.out host.err; do rm -f %[1]s/$f; ln -s %[2]s %[1]s/$f; done
  rm -f %[1]s/heartbeat; ln -s %[3]s %[1]s/heartbeat
  : > %[1]s/planted; kill -KILL $$
fi
echo done`, run, target.path, missing)
	cmd := exec.Command(bin("cryo"), "run", "--store", st, "--max-restarts", "2", "--restart-on-exit", "--heartbeat-timeout", "1m",
		"--", "/bin/sh", "-c", script)
	u.as(cmd)
	cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu)
	out, _ := cmd.CombinedOutput()
	if _, err := os.Stat(filepath.Join(run, "planted")); err != nil {
		t.Fatalf("the job did not plant its links (%v): cryo said %s", err, out)
	}
	if !strings.Contains(string(out), "failure: crash") {
		t.Errorf("the job was not taken for crashed and started again; cryo said %s", out)
	}
	target.intact(t, "links in the run directory")
	if _, err := os.Lstat(missing); err == nil {
		t.Errorf("cryo created %s through the heartbeat link", missing)
	}
}

// Attack 3: the store's staging directory and lock file replaced by links
// to root's directory and file, then the Slurm Epilog (root) tidies the
// store. It works in the store as the user and through directory fds: the
// links are not followed, root's files stay as they were.
func TestSecurityEpilogFollowsNoLinks(t *testing.T) {
	criu, u := requireUser(t)
	dir, st := userStore(t, criu, u)
	rd := rootDir(t)
	keep := newRootTarget(t, rd, "keep")
	// A lock file created through the link would be a file of root's
	// anywhere (think /etc/nologin): it must not come to exist.
	lockTarget := filepath.Join(rootDir(t), "nologin")
	for _, p := range []string{filepath.Join(st, "staging"), filepath.Join(st, "lock")} {
		if err := os.RemoveAll(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(rd, filepath.Join(st, "staging")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(lockTarget, filepath.Join(st, "lock")); err != nil {
		t.Fatal(err)
	}
	// The epilog finds the job's store as ROOT/cryo-$SLURM_JOB_ID.
	if err := os.Rename(st, filepath.Join(dir, "cryo-4242")); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin("cryo"), "slurm", "epilog", "--log", "stderr", "--store-root", dir)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "SLURM_JOB_ID=4242", "SLURM_JOB_USER=" + u.name,
		fmt.Sprintf("SLURM_JOB_UID=%d", u.uid), fmt.Sprintf("SLURM_JOB_GID=%d", u.gid),
		"SLURM_SCRIPT_CONTEXT=epilog_slurmd", "SLURM_JOB_EXIT_CODE=0", "SLURM_JOB_WORK_DIR=" + dir, "CRYO_CRIU=" + criu}
	out, _ := cmd.CombinedOutput()
	keep.intact(t, "the epilog with staging linked to root's directory")
	if _, err := os.Lstat(lockTarget); err == nil {
		t.Errorf("the epilog created %s through the store's lock link", lockTarget)
	}
	if ents, _ := os.ReadDir(rd); len(ents) != 1 {
		t.Errorf("root's directory behind the staging link holds %d entries after the epilog, want 1 (epilog said %s)", len(ents), out)
	}
}

// Attack 5: as root (sudo keeping CRYO_*), CRIU and libraries named by the
// environment come from a user's directory. Root runs and loads nothing
// that someone else could change: the CRIU is refused, the library is not
// loaded (it would leave a mark if it were; from root's own directory, it
// does).
func TestSecurityRootRunsNothingAUserCouldChange(t *testing.T) {
	criu, u := requireUser(t)
	dir := u.dir(t)
	theirs := filepath.Join(dir, "criu")
	if out, err := exec.Command("cp", criu, theirs).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	os.Chown(theirs, u.uid, u.gid)
	r := cryo(t, theirs, "check")
	if r.code != 1 || !strings.Contains(r.stderr, "root alone can change") {
		t.Errorf("as root with CRYO_CRIU in a user's directory: want exit 1 refusing it\n%s", r)
	}

	mark := filepath.Join(rootDir(t), "loaded")
	src := filepath.Join(t.TempDir(), "evil.c")
	code := fmt.Sprintf(`#include <stdio.h>
__attribute__((constructor)) static void mark(void) { FILE *f = fopen(%q, "a"); if (f) { fputs("loaded\n", f); fclose(f); } }
`, mark)
	if err := os.WriteFile(src, []byte(code), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		dir    string
		loaded bool
	}{{dir, false}, {rootDir(t), true}} {
		lib := filepath.Join(c.dir, "libcuda.so.1")
		if out, err := exec.Command("gcc", "-shared", "-fPIC", "-o", lib, src).CombinedOutput(); err != nil {
			t.Fatalf("gcc: %v %s", err, out)
		}
		if c.dir == dir {
			os.Chown(lib, u.uid, u.gid)
		}
		os.Remove(mark)
		cmd := cryoCommand(t.Context(), criu, "gpus")
		cmd.Env = append(cmd.Env, "CRYO_LIBCUDA="+lib, "CRYO_LIBNVML="+lib)
		_ = cmd.Run()
		_, err := os.Stat(mark)
		if loaded := err == nil; loaded != c.loaded {
			t.Errorf("as root, a library named by CRYO_LIBCUDA in %s was loaded: %v, want %v", c.dir, loaded, c.loaded)
		}
	}
}

// Attack 5, journals: a crafted intent journal in a user's store names a
// process of root's, stopped, for cryo to continue. The user's cryo cannot
// signal it (the kernel refuses), and root's cryo refuses the store.
func TestSecurityCraftedJournal(t *testing.T) {
	criu, u := requireUser(t)
	_, st := userStore(t, criu, u)
	victim := exec.Command("sleep", "300")
	victim.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { victim.Process.Kill(); victim.Wait() })
	syscall.Kill(victim.Process.Pid, syscall.SIGSTOP)
	stat, err := proc.ReadStat(victim.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	jdir := filepath.Join(st, "staging", "journal")
	os.MkdirAll(jdir, 0o700)
	lines := []map[string]any{
		{"v": 1, "at": time.Now(), "event": "begin", "op": "checkpoint", "cryo_pid": 1,
			"job": map[string]any{"root_pid": victim.Process.Pid, "procs": []map[string]any{{"pid": victim.Process.Pid, "start_time": stat.StartTime}}}},
		{"v": 1, "at": time.Now(), "event": "stopped"},
	}
	var b bytes.Buffer
	for _, l := range lines {
		j, _ := json.Marshal(l)
		b.Write(append(j, '\n'))
	}
	jf := filepath.Join(jdir, fmt.Sprintf("checkpoint-%d-1.jsonl", time.Now().UnixNano()))
	if err := os.WriteFile(jf, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	exec.Command("chown", "-R", fmt.Sprintf("%d:%d", u.uid, u.gid), filepath.Join(st, "staging")).Run()
	u.cryo(t, criu, "recover", "--store", st)
	if r := cryo(t, criu, "recover", "--store", st); r.code != 1 || !strings.Contains(r.stderr, "root alone can change") {
		t.Errorf("as root, recover on a user's store: want exit 1 refusing it\n%s", r)
	}
	if s, _ := proc.ReadStat(victim.Process.Pid); s.State != 'T' {
		t.Errorf("root's stopped process was continued by a crafted journal (state %c)", s.State)
	}
}

// There is no node daemon for a user to hand a job to.
func TestSecurityNoDaemon(t *testing.T) {
	requireBinaries(t)
	for _, args := range [][]string{{"monitor"}, {"run", "--monitor", "/tmp/x.sock", "--", "/bin/true"}} {
		if r := cryo(t, "", args...); r.code != 2 {
			t.Errorf("cryo %s: exit %d, want 2 (no such command or flag)\n%s", strings.Join(args, " "), r.code, r)
		}
	}
}
