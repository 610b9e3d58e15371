package e2e

import (
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
)

// How cryo run meets failures, as a user expects: the job's own exit code
// passes through, the whole job (and nothing else) ends before a restore,
// a restore that cannot work is tried once, and the output after a
// restore is what an uninterrupted run prints.

// hostPID asks the supervisor which PID the host tree has (once it knows).
func hostPID(t *testing.T, criu, store string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := cryo(t, criu, "ctl", "--store", store, "--json", "status")
		var resp struct {
			Jobs []struct {
				Trees map[string]int `json:"trees"`
			} `json:"jobs"`
		}
		if r.code == 0 && json.Unmarshal([]byte(r.stdout), &resp) == nil && len(resp.Jobs) == 1 && resp.Jobs[0].Trees["host"] != 0 {
			return resp.Jobs[0].Trees["host"]
		}
		if time.Now().After(deadline) {
			t.Fatalf("ctl status names no host tree: %s", r)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFile waits until the file at p contains s.
func waitFile(t *testing.T, p, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never held %q within %v; it holds %q", p, s, timeout, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readPID(t *testing.T, p string) int {
	t.Helper()
	waitFile(t, p, "\n", 30*time.Second)
	b, _ := os.ReadFile(p)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: %q", p, b)
	}
	return pid
}

// A job that exits with a code of its own has given its answer: cryo run
// exits with it at once, without restarting anything. With
// --restart-on-exit the same exit is a failure to restart from.
func TestRunPassesExitCodeThrough(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	start := time.Now()
	r := startRun(t, criu, "--store", filepath.Join(dir, "a"), "--", "/bin/sh", "-c", "echo working; exit 3")
	code := r.wait(t, 30*time.Second)
	msgs := r.messages(t)
	if code != 3 {
		t.Fatalf("cryo run exited %d, want the job's 3\ncryo said:\n%s", code, msgs)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("passing exit code 3 through took %v", took)
	}
	if strings.Contains(msgs, "failure") || strings.Contains(msgs, "restored") || strings.Contains(msgs, "gave up") {
		t.Errorf("a job's own exit code was taken for a failure:\n%s", msgs)
	}
	if b, _ := os.ReadFile(r.out); string(b) != "working\n" {
		t.Errorf("the job ran other than once: %q", b)
	}

	r = startRun(t, criu, "--store", filepath.Join(dir, "b"), "--restart-on-exit", "--max-restarts", "2",
		"--", "/bin/sh", "-c", "echo working; exit 3")
	code = r.wait(t, 60*time.Second)
	msgs = r.messages(t)
	if code != 3 || strings.Count(msgs, "cryo: failure: exit: host tree") != 3 || !strings.Contains(msgs, "gave up restoring the job after 2 restarts") {
		t.Errorf("with --restart-on-exit: exit %d, want 3 after 3 failures and 2 restarts\ncryo said:\n%s", code, msgs)
	}
	if b, _ := os.ReadFile(r.out); strings.Count(string(b), "working") != 3 {
		t.Errorf("with --restart-on-exit the job ran %d times, want 3", strings.Count(string(b), "working"))
	}
}

// job-init never exits while a process of the job lives: what the host
// leaves behind is ended when it ends; and when job-init itself is killed,
// cryo ends and reaps its orphans before anything else. Without namespaces
// this is job-init's and cryo's own work (with them, the kernel ends a PID
// namespace with its init: TestRunNamespacedJobEndsWhole).
func TestRunEndsTheWholeJob(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	bg := filepath.Join(dir, "bg")
	r := startRun(t, criu, "--store", filepath.Join(dir, "a"), "--grace", "1s", "--namespaces", "off",
		"--", "/bin/sh", "-c", "sleep 300 & echo $! > "+bg+"; echo started")
	if code := r.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("cryo run exited %d\n%s", code, r.messages(t))
	}
	if pid := readPID(t, bg); alive(pid) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Errorf("the host's background child %d outlived the job", pid)
	}

	bg2 := filepath.Join(dir, "bg2")
	r = startRun(t, criu, "--store", filepath.Join(dir, "b"), "--max-restarts", "0", "--namespaces", "off",
		"--", "/bin/sh", "-c", "sleep 300 & echo $! > "+bg2+"; wait")
	child := readPID(t, bg2)
	m := jobInitRE.FindStringSubmatch(r.messages(t))
	if m == nil {
		t.Fatalf("no job-init pid in %q", r.messages(t))
	}
	init, _ := strconv.Atoi(m[1])
	host := hostPID(t, criu, filepath.Join(dir, "b"))
	syscall.Kill(init, syscall.SIGKILL)
	code := r.wait(t, 30*time.Second)
	msgs := r.messages(t)
	if code != 1 || !strings.Contains(msgs, fmt.Sprintf("failure: crash: job-init (pid %d) was killed by SIGKILL", init)) {
		t.Errorf("after job-init was killed: exit %d\ncryo said:\n%s", code, msgs)
	}
	for _, pid := range []int{host, child} {
		if procState(pid) != 0 {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("pid %d of the job is still there (state %c) after cryo run ended", pid, procState(pid))
		}
	}
}

// A restore failure that will recur (a file the job had open is gone) is
// tried once and reported once, in a few lines: CRIU's line and the log.
func TestRunRecurringRestoreFailureIsTriedOnce(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st, input := filepath.Join(dir, "store"), filepath.Join(dir, "input")
	if err := os.WriteFile(input, []byte("data\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, criu, "--store", st, "--max-restarts", "5",
		"--", "/bin/sh", "-c", "exec 3<"+input+"; echo ready; while :; do sleep 0.1; done")
	waitFile(t, r.out, "ready", 30*time.Second)
	r.cmd.Process.Signal(syscall.SIGUSR1)
	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	host := hostPID(t, criu, st)
	os.Remove(input)
	start := time.Now()
	syscall.Kill(host, syscall.SIGKILL)
	code := r.wait(t, 60*time.Second)
	msgs := r.messages(t)
	if code != 1 {
		t.Fatalf("cryo run exited %d, want 1\ncryo said:\n%s", code, msgs)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("giving up took %v: retried?", took)
	}
	if n := strings.Count(msgs, "Can't open file"); n != 1 {
		t.Errorf("the failure is reported %d times, want once\ncryo said:\n%s", n, msgs)
	}
	if !strings.Contains(msgs, "a file the job had open is gone") || !strings.Contains(msgs, filepath.Join(st, "logs")) {
		t.Errorf("the report does not say what it means and where CRIU's log is:\n%s", msgs)
	}
	if n := strings.Count(msgs, "\n"); n > 8 {
		t.Errorf("%d lines for one failure:\n%s", n, msgs)
	}
	if logs, _ := filepath.Glob(filepath.Join(st, "logs", "*restore*")); len(logs) != 1 {
		t.Errorf("%d restores ran, want 1: %v", len(logs), logs)
	}
}

// takePID starts argv (in a session of its own) as PID want, by setting
// the kernel's last PID just before the fork (root only). Other forks on
// the node may come between: it retries.
func takePID(t *testing.T, want int, argv ...string) *exec.Cmd {
	t.Helper()
	for try := 0; try < 500; try++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(want)); err == nil {
			t.Fatalf("pid %d is taken already", want)
		}
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(want-1)), 0); err != nil {
			skipOrFail(t, "cannot choose PIDs here: "+err.Error())
		}
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if cmd.Process.Pid == want {
			return cmd
		}
		cmd.Process.Kill()
		cmd.Wait()
	}
	t.Fatalf("could not start a process as pid %d", want)
	return nil
}

// Processes that are not the job's but hold its old PIDs (as a process,
// or as the session of a member whose leader is gone) make a restore on
// this node impossible without PID namespaces: cryo refuses at once, says
// which PID and who holds it, and leaves them alone; once they are gone,
// the same command resumes the job.
func TestRunRestoreLeavesHoldersOfOldPIDsAlone(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st := filepath.Join(dir, "store")
	// Without namespaces the job needs its own PIDs back (with them it does
	// not: TestRunNamespacedRestoreWhilePIDsAreTaken).
	args := []string{"--store", st, "--namespaces", "off", "--", "/bin/sh", "-c", "echo ready; while :; do sleep 0.1; done"}
	r := startRun(t, criu, args...)
	waitFile(t, r.out, "ready", 30*time.Second)
	r.cmd.Process.Signal(syscall.SIGTERM)
	if code := r.wait(t, 30*time.Second); code != 143 {
		t.Fatalf("stop: exit %d\n%s", code, r.messages(t))
	}
	m := manifest(t, st, 1)
	var host int
	for _, p := range m.Job.Processes {
		if p.PPID == m.Job.RootPID && p.Comm == "sh" {
			host = p.PID
		}
	}
	if host == 0 {
		t.Fatalf("no host in generation 1: %+v", m.Job.Processes)
	}
	// An unrelated process as job-init's old PID, and a session whose
	// leader took the host's old PID and is gone.
	holder := takePID(t, m.Job.RootPID, "sleep", "300")
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	memberFile := filepath.Join(dir, "member")
	leader := takePID(t, host, "/bin/sh", "-c", "sleep 300 & echo $! > "+memberFile)
	leader.Wait()
	member := readPID(t, memberFile)
	t.Cleanup(func() { syscall.Kill(member, syscall.SIGKILL) })

	r2 := startRun(t, criu, args...)
	code := r2.wait(t, 60*time.Second)
	msgs := r2.messages(t)
	if code != 1 || !strings.Contains(msgs, fmt.Sprintf("pid %d", m.Job.RootPID)) || !strings.Contains(msgs, "live process") ||
		!strings.Contains(msgs, "never signals processes outside the job") {
		t.Errorf("resume while other processes hold the job's PIDs: exit %d, want 1 naming pid %d and its live holder\ncryo said:\n%s",
			code, m.Job.RootPID, msgs)
	}
	if !alive(holder.Process.Pid) || !alive(member) {
		t.Fatalf("cryo signalled processes outside the job: holder alive %v, session member alive %v", alive(holder.Process.Pid), alive(member))
	}
	if logs, _ := filepath.Glob(filepath.Join(st, "logs", "*restore*")); len(logs) > 0 {
		t.Errorf("CRIU ran although the PIDs are taken: %v", logs)
	}

	// The session's number alone still blocks the restore.
	holder.Process.Kill()
	holder.Wait()
	r3 := startRun(t, criu, args...)
	code = r3.wait(t, 60*time.Second)
	if msgs := r3.messages(t); code != 1 || !strings.Contains(msgs, fmt.Sprintf("pid %d", host)) ||
		!strings.Contains(msgs, "session") && !strings.Contains(msgs, "process group") || !alive(member) {
		t.Errorf("resume while a session holds the host's PID: exit %d, member alive %v\ncryo said:\n%s", code, alive(member), msgs)
	}

	// With both gone, the job resumes.
	syscall.Kill(member, syscall.SIGKILL)
	waitEnded(t, 10*time.Second, member)
	for deadline := time.Now().Add(10 * time.Second); procState(member) != 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond) // init reaps it
	}
	r4 := startRun(t, criu, args...)
	r4.waitFor(t, "restored: generation 1", 60*time.Second)
	r4.cmd.Process.Signal(syscall.SIGTERM)
	if code := r4.wait(t, 30*time.Second); code != 143 {
		t.Errorf("the resumed job did not stop with 143: %d\n%s", code, r4.messages(t))
	}
}

// A job killed mid-run under cryo run prints exactly what an uninterrupted
// run prints, once: in host.out, in what cryo relays, and in a file the
// job writes itself. Also: host.out is 0600, the job's stderr comes
// prefixed, and checkpoints are reported in MiB with their durable time.
func TestRunOutputOnceAfterRestore(t *testing.T) {
	criu := requireCRIU(t)
	const steps = 80
	dir := t.TempDir()
	st, own := filepath.Join(dir, "store"), filepath.Join(dir, "own.log")
	script := fmt.Sprintf(`exec 4>>%s; i=0; while [ $i -lt %d ]; do i=$((i+1)); echo "step $i"; echo "line $i" >&4; sleep 0.05; done; echo "job: done" >&2; echo "result ok"`, own, steps)
	var want, wantOwn strings.Builder
	for i := 1; i <= steps; i++ {
		fmt.Fprintf(&want, "step %d\n", i)
		fmt.Fprintf(&wantOwn, "line %d\n", i)
	}
	want.WriteString("result ok\n")

	r := startRunWith(t, criu, true, "--store", st, "--", "/bin/sh", "-c", script)
	hostOut := filepath.Join(st, "run", "host.out")
	waitFile(t, hostOut, "step 20\n", 30*time.Second)
	r.cmd.Process.Signal(syscall.SIGUSR1)
	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	waitFile(t, hostOut, "step 45\n", 30*time.Second)
	syscall.Kill(hostPID(t, criu, st), syscall.SIGKILL)
	if code := r.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("cryo run exited %d\n%s", code, r.messages(t))
	}
	msgs := r.messages(t)
	if !strings.Contains(msgs, "restored: generation 1") || !strings.Contains(msgs, "truncated: ") {
		t.Errorf("no restore with the output cut back:\n%s", msgs)
	}
	for _, c := range []struct{ what, path, want string }{
		{"host.out", hostOut, want.String()},
		{"what cryo relayed to its stdout", r.out, want.String()},
		{"the job's own log", own, wantOwn.String()},
	} {
		if b, _ := os.ReadFile(c.path); string(b) != c.want {
			t.Errorf("%s differs from an uninterrupted run's:\n%s\nwant %d lines 1..%d once", c.what, compactLines(string(b)), steps, steps)
		}
	}
	if fi, err := os.Stat(hostOut); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("host.out: %v, mode %v; want 0600", err, fi.Mode())
	}
	if !strings.Contains(msgs, "host: job: done\n") || strings.Contains(msgs, "\njob: done") {
		t.Errorf("the job's stderr is not told apart from cryo's messages:\n%s", msgs)
	}
	if !strings.Contains(msgs, " KiB of images,") && !strings.Contains(msgs, " MiB of images,") || !strings.Contains(msgs, "durable after") {
		t.Errorf("checkpoints not reported like cryo checkpoint's:\n%s", msgs)
	}
}

// compactLines shows a long output by its numbered lines.
func compactLines(s string) string {
	lines := strings.Split(strings.TrimSuffix(s, "\n"), "\n")
	var nums []int
	var other []string
	for _, l := range lines {
		if f := strings.Fields(l); len(f) == 2 && (f[0] == "step" || f[0] == "line") {
			if n, err := strconv.Atoi(f[1]); err == nil {
				nums = append(nums, n)
				continue
			}
		}
		other = append(other, l)
	}
	return compact(nums) + " " + strings.Join(other, " | ")
}

// The job's processes on the node, by PID: those in job-init's PID
// namespace (job-init included).
func namespaceMembers(t *testing.T, nsLink string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); err == nil && l == nsLink {
			out = append(out, pid)
		}
	}
	return out
}

// With namespaces, the job is every process of its PID namespace: what the
// host leaves behind ends with it, and nothing of the job is left on the
// node once cryo run has ended, also when job-init itself is killed.
func TestRunNamespacedJobEndsWhole(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	for _, how := range []string{"host ends", "job-init killed"} {
		t.Run(how, func(t *testing.T) {
			bg := filepath.Join(dir, strings.ReplaceAll(how, " ", "-"))
			script := "sleep 300 & echo $! > " + bg + "; echo started"
			if how == "job-init killed" {
				script += "; wait"
			}
			r := startRun(t, criu, "--store", filepath.Join(dir, how), "--grace", "1s", "--max-restarts", "0",
				"--namespaces", "on", "--", "/bin/sh", "-c", script)
			readPID(t, bg)
			m := jobInitRE.FindStringSubmatch(r.messages(t))
			if m == nil {
				t.Fatalf("no job-init pid in %q", r.messages(t))
			}
			init, _ := strconv.Atoi(m[1])
			ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", init))
			if err != nil {
				t.Fatal(err)
			}
			if own, _ := os.Readlink("/proc/self/ns/pid"); own == ns {
				t.Fatalf("job-init (pid %d) is in the node's PID namespace", init)
			}
			if n := len(namespaceMembers(t, ns)); how == "job-init killed" && n < 3 {
				t.Fatalf("the job's PID namespace has %d processes, want job-init, the host and its child", n)
			}
			if how == "job-init killed" {
				syscall.Kill(init, syscall.SIGKILL)
			}
			r.wait(t, 30*time.Second)
			if left := namespaceMembers(t, ns); len(left) > 0 {
				t.Errorf("processes of the job are left on the node after cryo run ended: %v", left)
			}
		})
	}
}

// With namespaces, a restore does not need the job's old PIDs: while other
// processes hold the PIDs job-init and the host had on the node, the job
// comes back in fresh namespaces, and neither holder is touched.
func TestRunNamespacedRestoreWhilePIDsAreTaken(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st, mark := filepath.Join(dir, "store"), filepath.Join(dir, "count")
	args := []string{"--store", st, "--namespaces", "on", "--", "/bin/sh", "-c",
		"i=0; while :; do i=$((i+1)); echo $i > " + mark + "; sleep 0.05; done"}
	r := startRun(t, criu, args...)
	waitFile(t, mark, "\n", 30*time.Second)
	host := hostPID(t, criu, st)
	m := jobInitRE.FindStringSubmatch(r.messages(t))
	init, _ := strconv.Atoi(m[1])
	r.cmd.Process.Signal(syscall.SIGTERM)
	if code := r.wait(t, 30*time.Second); code != 143 {
		t.Fatalf("stop: exit %d\n%s", code, r.messages(t))
	}
	waitEnded(t, 10*time.Second, init, host)
	for deadline := time.Now().Add(10 * time.Second); (procState(init) != 0 || procState(host) != 0) && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond) // init reaps them
	}
	before, _ := strconv.Atoi(strings.TrimSpace(string(readOrEmpty(mark))))
	var holders []*exec.Cmd
	for _, pid := range []int{init, host} {
		h := takePID(t, pid, "sleep", "300")
		holders = append(holders, h)
		t.Cleanup(func() { h.Process.Kill(); h.Wait() })
	}
	r2 := startRun(t, criu, args...)
	r2.waitFor(t, "restored: generation 1", 60*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for {
		now, _ := strconv.Atoi(strings.TrimSpace(string(readOrEmpty(mark))))
		if now > before+5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restored job does not count on from %d (at %d)\n%s", before, now, r2.messages(t))
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, h := range holders {
		if !alive(h.Process.Pid) {
			t.Errorf("cryo ended pid %d, which held one of the job's old PIDs", h.Process.Pid)
		}
	}
	r2.cmd.Process.Signal(syscall.SIGTERM)
	r2.wait(t, 30*time.Second)
}

func readOrEmpty(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

// The node's mounts change while a job in namespaces of its own runs (a
// network namespace's nsfs mount in /run/netns comes and goes): its
// checkpoints and its restore take the node's tree as it is then, and the
// job finishes right.
func TestRunNodeMountsComeAndGo(t *testing.T) {
	criu := requireCRIU(t)
	netns := func(op, name string) {
		t.Helper()
		if out, err := exec.Command("ip", "netns", op, name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns %s %s: %v %s", op, name, err, out)
		}
	}
	names := []string{fmt.Sprintf("cryo-t%d-a", os.Getpid()), fmt.Sprintf("cryo-t%d-b", os.Getpid())}
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	wasMounted := strings.Contains(string(mountinfo), " /run/netns /run/netns ")
	t.Cleanup(func() {
		for _, n := range names {
			_ = exec.Command("ip", "netns", "del", n).Run()
		}
		if !wasMounted {
			// ip netns made /run/netns a mount of the node: leave the node
			// as the test found it.
			for exec.Command("umount", "/run/netns").Run() == nil {
			}
			os.Remove("/run/netns")
		}
	})
	netns("add", names[0]) // in the job's namespace from its start
	const steps = 120
	want := reference(t, "memstate", "-steps", strconv.Itoa(steps), "-mem", "4")
	dir := t.TempDir()
	st := filepath.Join(dir, "store")
	r := startRun(t, criu, "--store", st, "--interval", "500ms", "--namespaces", "on", "--",
		bin("memstate"), "-steps", strconv.Itoa(steps), "-mem", "4", "-delay", "30ms")
	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	netns("del", names[0]) // gone from the node before the restore
	host := hostPID(t, criu, st)
	syscall.Kill(host, syscall.SIGKILL)
	r.waitFor(t, "restored: generation", 30*time.Second)
	netns("add", names[1]) // comes and goes after the restore
	netns("del", names[1])
	n := strings.Count(r.messages(t), "checkpoint: generation")
	for deadline := time.Now().Add(30 * time.Second); strings.Count(r.messages(t), "checkpoint: generation") < n+2; {
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint after the node's mounts changed:\n%s", r.messages(t))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code := r.wait(t, 90*time.Second); code != 0 {
		t.Fatalf("cryo run exited %d\n%s", code, r.messages(t))
	}
	if msgs := r.messages(t); strings.Contains(msgs, "checkpoint-failed") || strings.Contains(msgs, "restore-failed") {
		t.Errorf("a checkpoint or restore failed as the node's mounts changed:\n%s", msgs)
	}
	p := readProgress(t, r.out)
	if p.result != want {
		t.Errorf("the job finished with %q, an uninterrupted run with %q", p.result, want)
	}
}
