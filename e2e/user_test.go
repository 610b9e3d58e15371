package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// The user-mode tier: cryo run as an unprivileged user (CRYO_TEST_USER,
// default cryo-test, which `make test` creates), as HPC users run it. The
// tests themselves run as root only to start processes as that user; cryo,
// CRIU and the jobs run as the user alone.

// testUser is the unprivileged account the user-mode tier runs cryo as.
type testUser struct {
	name     string
	uid, gid int
	home     string
}

// requireUser returns CRIU and the test user, after checking that the tier
// can run: root (to become the user), CRIU, and the user.
func requireUser(t *testing.T) (string, testUser) {
	t.Helper()
	criu := requireCRIU(t)
	name := os.Getenv("CRYO_TEST_USER")
	if name == "" {
		name = "cryo-test"
	}
	u, err := user.Lookup(name)
	if err != nil {
		skipOrFail(t, fmt.Sprintf("no test user %q (`make test-user` creates it): %v", name, err))
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if uid == 0 {
		t.Fatalf("test user %s is root", name)
	}
	return criu, testUser{name: name, uid: uid, gid: gid, home: u.HomeDir}
}

// dir is a fresh directory the user owns, in a directory everyone may
// enter; the user removes it at the end of the test (root does not delete
// in directories a user can write).
func (u testUser) dir(t *testing.T) string {
	t.Helper()
	parent, err := os.MkdirTemp("", "cryo-user-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	d := filepath.Join(parent, "d")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, u.uid, u.gid); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		rm := exec.Command("find", d, "-xdev", "-mindepth", "1", "-delete")
		u.as(rm)
		if out, err := rm.CombinedOutput(); err != nil {
			t.Errorf("the test user could not empty %s: %v %s", d, err, out)
		}
		// Empty now, and in root's own directory.
		_ = os.Remove(d)
		_ = os.Remove(parent)
	})
	return d
}

// as makes cmd run as the user, with the user's HOME and a clean
// environment (PATH, and nothing of root's CRYO_ settings).
func (u testUser) as(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: []uint32{uint32(u.gid)}}
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + u.home, "USER=" + u.name, "LOGNAME=" + u.name}
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
}

// cryo runs the built cryo as the user, with CRYO_CRIU set to criu.
func (u testUser) cryo(t *testing.T, criu string, args ...string) cryoResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin("cryo"), args...)
	u.as(cmd)
	cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	return runCryo(t, cmd, &out, &errb, append([]string{"(as " + u.name + ")"}, args...))
}

// startJob runs workload name as the user, as startJob does for root.
func (u testUser) startJob(t *testing.T, name, out string, args ...string) *job {
	t.Helper()
	// The job's output is the user's file, as when they start it.
	if err := os.WriteFile(out, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(out, u.uid, u.gid); err != nil {
		t.Fatal(err)
	}
	return startJobWith(t, name, out, false, u.as, args...)
}

// userProcess is what /proc says of a restored process's credentials.
type userProcess struct {
	uids, gids string // real, effective, saved, file system
	capEff     string
}

func readUserProcess(t *testing.T, pid int) userProcess {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var p userProcess
	for _, l := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(l, ":")
		switch k {
		case "Uid":
			p.uids = strings.Join(strings.Fields(v), " ")
		case "Gid":
			p.gids = strings.Join(strings.Fields(v), " ")
		case "CapEff":
			p.capEff = strings.TrimSpace(v)
		}
	}
	return p
}

// TestUserKillRestore is cryo's main promise for a user who is not root:
// their job, checkpointed with --kill and restored by them, finishes with
// the same result as an uninterrupted run, and every restored process has
// exactly their credentials and no capability.
func TestUserKillRestore(t *testing.T) {
	criu, u := requireUser(t)
	for _, w := range killRestoreCases {
		if w.name == "tcp" {
			continue // TestUserRefusesTCP
		}
		t.Run(w.name, func(t *testing.T) {
			want := reference(t, w.name, w.args(t.TempDir())...)
			dir := u.dir(t)
			st, out, wdir := filepath.Join(dir, "store"), filepath.Join(dir, "job.out"), filepath.Join(dir, "w")
			mkdirAs(t, u, wdir)
			j := u.startJob(t, w.name, out, append(w.args(wdir), "-delay", jobDelay)...)
			waitStep(t, out, stepFirst, 30*time.Second)

			if r := u.cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
				t.Fatalf("a user's checkpoint --kill failed: %s", r)
			}
			j.waitExit(t, 10*time.Second)
			at := readProgress(t, out).last()
			r := u.cryo(t, criu, "restore", "--store", st)
			if r.code != 0 {
				t.Fatalf("a user's restore failed: %s", r)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
			if err != nil {
				t.Fatalf("restore printed %q, not a PID", r.stdout)
			}
			want4 := fmt.Sprintf("%d %d %d %d", u.uid, u.uid, u.uid, u.uid)
			pids, err := proc.Tree(pid)
			if err != nil || len(pids) != w.procs {
				t.Fatalf("restored tree of pid %d: %v, %v; want %d processes", pid, pids, err, w.procs)
			}
			for _, p := range pids {
				got := readUserProcess(t, p)
				if got.uids != want4 || got.gids != fmt.Sprintf("%d %d %d %d", u.gid, u.gid, u.gid, u.gid) {
					t.Errorf("restored pid %d has uids %q gids %q, want the user's own (%d/%d)", p, got.uids, got.gids, u.uid, u.gid)
				}
				if got.capEff != "0000000000000000" {
					t.Errorf("restored pid %d has capabilities %s, want none", p, got.capEff)
				}
			}
			waitEnded(t, time.Minute, pid)
			p := readProgress(t, out)
			checkRun(t, "restored job", p.steps, 1, jobSteps)
			if p.result != want {
				t.Errorf("restored job finished with %q, want %q (an uninterrupted run's)", p.result, want)
			}
			if len(p.steps) > 0 && p.steps[0] != 1 || at == 0 {
				t.Errorf("the job was checkpointed at step %d", at)
			}
		})
	}
}

// TestUserRefusesTCP: a user's CRIU cannot checkpoint a TCP connection
// (TCP repair needs CAP_NET_ADMIN). cryo says so in one line naming the
// process, before dumping anything: no generation, and the job runs on to
// its normal end.
func TestUserRefusesTCP(t *testing.T) {
	criu, u := requireUser(t)
	w := killRestoreCases[3]
	if w.name != "tcp" {
		t.Fatal("killRestoreCases changed: find the tcp workload")
	}
	want := reference(t, w.name, w.args("")...)
	dir := u.dir(t)
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := u.startJob(t, w.name, out, append(w.args(""), "-delay", jobDelay)...)
	waitStep(t, out, stepFirst, 30*time.Second)
	r := u.cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid))
	if r.code != 1 {
		t.Fatalf("checkpoint of a job with a TCP connection, as a user: want exit 1\n%s", r)
	}
	msg := strings.TrimSpace(r.stderr)
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "TCP connection") || !strings.Contains(msg, "pid ") ||
		!strings.Contains(msg, "CAP_NET_ADMIN") {
		t.Errorf("want one line naming the process, the TCP connection and why; got:\n%s", msg)
	}
	if l := u.cryo(t, criu, "list", "--store", st, "--json"); l.code == 0 && strings.Contains(l.stdout, `"generation"`) {
		t.Errorf("a refused checkpoint left a generation: %s", l.stdout)
	}
	j.waitExit(t, time.Minute)
	p := readProgress(t, out)
	checkRun(t, "job whose checkpoint was refused", p.steps, 1, jobSteps)
	if p.result != want {
		t.Errorf("job whose checkpoint was refused finished with %q, want %q", p.result, want)
	}
}

func mkdirAs(t *testing.T, u testUser, p string) {
	t.Helper()
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, u.uid, u.gid); err != nil {
		t.Fatal(err)
	}
}

// TestUserRunRestoresAKilledTree: cryo run as a user who is not root, with
// a host and an offload worker in the job's own namespaces: the worker is
// killed mid-run, cryo restores the last checkpoint from before, and the
// job finishes with an uninterrupted run's answer, printed once; every
// process of the job runs as the user, with no capability, in a PID
// namespace of its own.
func TestUserRunRestoresAKilledTree(t *testing.T) {
	criu, u := requireUser(t)
	buildOffload(t)
	const items = 160
	want := offloadReference(t, items)
	dir := u.dir(t)
	st, sock, fault := filepath.Join(dir, "store"), filepath.Join(dir, "w.sock"), filepath.Join(dir, "fault-done")
	worker := fmt.Sprintf("%s -role worker -addr %s -fault kill -fault-at 100 -fault-file %s", bin("offload"), sock, fault)
	script := fmt.Sprintf(`exec %s run --store %s --interval 1s --namespaces on --offload %q -- %s -role host -addr %s -items %d -delay 25ms >%s/run.out 2>%s/run.err`,
		bin("cryo"), st, worker, bin("offload"), sock, items, dir, dir)
	cmd := exec.Command("/bin/sh", "-c", script)
	u.as(cmd)
	cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// While it runs: the job is the user's, with no capability, in a PID
	// namespace that is not the node's.
	own, _ := os.Readlink("/proc/self/ns/pid")
	deadline := time.Now().Add(30 * time.Second)
	seen := 0
	for seen == 0 && time.Now().Before(deadline) {
		tab, _ := proc.All()
		for pid := range tab {
			exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			if err != nil || exe != bin("offload") {
				continue
			}
			seen++
			if got := readUserProcess(t, pid); !strings.HasPrefix(got.uids, strconv.Itoa(u.uid)+" ") || got.capEff != "0000000000000000" {
				t.Errorf("pid %d of the job: uids %q, capabilities %s; want the user's and none", pid, got.uids, got.capEff)
			}
			if ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); ns == own {
				t.Errorf("pid %d of the job is in the node's PID namespace", pid)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if seen == 0 {
		t.Error("never saw the job's processes")
	}
	select {
	case err := <-done:
		msgs, _ := os.ReadFile(filepath.Join(dir, "run.err"))
		if err != nil {
			t.Fatalf("cryo run as the user: %v\n%s", err, msgs)
		}
		p := readProgress(t, filepath.Join(dir, "run.out"))
		checkRun(t, "the user's restored job", p.steps, 1, items) // each step once, in order
		if "result "+p.result != want {
			t.Errorf("the job's answer %q, an uninterrupted run's %q\n%s", p.result, want, msgs)
		}
		if _, err := os.Stat(fault); err != nil {
			t.Errorf("the fault never struck: %s", msgs)
		}
		if !strings.Contains(string(msgs), "restored: generation") {
			t.Errorf("cryo did not restore a checkpoint:\n%s", msgs)
		}
	case <-time.After(3 * time.Minute):
		cmd.Process.Kill()
		t.Fatal("cryo run as the user did not finish in 3 min")
	}
}

// TestUserRunOnANodeWithSharedNetns: on a node where `ip netns` has made
// /run/netns a shared mount, a user's job in namespaces of its own holds a
// slave of it; its checkpoints after a restore take that mount as external
// too (CRIU refused them: "has unreachable sharing"), so the job is
// restored twice and still finishes as an uninterrupted run.
func TestUserRunOnANodeWithSharedNetns(t *testing.T) {
	criu, u := requireUser(t)
	mounted := func() bool {
		b, _ := os.ReadFile("/proc/self/mountinfo")
		return strings.Contains(string(b), " /run/netns /run/netns ")
	}
	if !mounted() {
		name := fmt.Sprintf("cryo-shared-%d", os.Getpid())
		for _, op := range []string{"add", "del"} {
			if out, err := exec.Command("ip", "netns", op, name).CombinedOutput(); err != nil {
				t.Fatalf("ip netns %s: %v %s", op, err, out)
			}
		}
		t.Cleanup(func() {
			for mounted() {
				if exec.Command("umount", "/run/netns").Run() != nil {
					break
				}
			}
			os.Remove("/run/netns")
		})
	}
	const steps = 150
	want := reference(t, "memstate", "-steps", strconv.Itoa(steps), "-mem", "4")
	dir := u.dir(t)
	st := filepath.Join(dir, "store")
	script := fmt.Sprintf(`exec %s run --store %s --interval 300ms --namespaces on -- %s -steps %d -mem 4 -delay 30ms >%s/run.out 2>%s/run.err`,
		bin("cryo"), st, bin("memstate"), steps, dir, dir)
	cmd := exec.Command("/bin/sh", "-c", script)
	u.as(cmd)
	cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	msgs := func() string { b, _ := os.ReadFile(filepath.Join(dir, "run.err")); return string(b) }
	waitFor := func(what string, ok func(string) bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(msgs()); {
			if time.Now().After(deadline) {
				t.Fatalf("no %s:\n%s", what, msgs())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for restore := 1; restore <= 2; restore++ {
		// A checkpoint, after the restore before it for the second round.
		n := strings.Count(msgs(), "checkpoint: generation")
		waitFor("checkpoint", func(m string) bool { return strings.Count(m, "checkpoint: generation") > n })
		syscall.Kill(hostPID(t, criu, st), syscall.SIGKILL)
		waitFor("restore", func(m string) bool { return strings.Count(m, "restored: generation") >= restore })
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cryo run as the user: %v\n%s", err, msgs())
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("the job did not end:\n%s", msgs())
	}
	if strings.Contains(msgs(), "checkpoint-failed") {
		t.Errorf("a checkpoint failed:\n%s", msgs())
	}
	p := readProgress(t, filepath.Join(dir, "run.out"))
	checkRun(t, "the twice restored job", p.steps, 1, steps)
	if p.result != want {
		t.Errorf("the job's answer %q, an uninterrupted run's %q\n%s", p.result, want, msgs())
	}
}
