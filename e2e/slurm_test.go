package e2e

// The TestSlurm* tests run cryo under a real Slurm: a private slurmctld and
// slurmd (Debian's, installed by `make deps`) on loopback, configured in a
// temporary directory and torn down when the test ends, even when it fails.
// The daemons run as root (SlurmUser=root), and jobs are submitted as root
// unless a test names a user: one job of the prolog test runs as nobody to
// check what the prolog gives the job's user, and TestSlurmRequeueAsUser's
// job runs as a user who is not root, as users run cryo (CRIU unprivileged).
//
// Slurm's timings shape them (see /work/shared/SLURM-TEST.md): a requeued
// job runs again 5-7 s later; `--signal=B:USR1@5` on a one-minute job
// arrives 25-55 s in. Every wait is bounded.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cryolib "github.com/cryo-hpc/cryo"
)

// slurmRequire checks that the test can run a Slurm (root, CRIU, Slurm's
// daemons and commands) and returns the CRIU binary.
func slurmRequire(t *testing.T) string {
	t.Helper()
	criu := requireCRIU(t)
	for _, b := range []string{"slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"} {
		if _, err := slurmLook(b); err != nil {
			skipOrFail(t, fmt.Sprintf("Slurm is not installed (%s not found); `make deps` installs slurmctld, slurmd and slurm-client", b))
		}
	}
	return criu
}

func slurmLook(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

// slurmCluster is a private Slurm: one controller and one node, on loopback.
type slurmCluster struct {
	dir, conf, name string
	criu            string
	env             []string // for Slurm's commands and jobs
	daemons         []*exec.Cmd
	hookLog         string
}

// slurmOpts configure a cluster.
type slurmOpts struct {
	// hooks installs contrib/slurm's Prolog and Epilog, with hookEnv as
	// their cryo-slurm.env.
	hooks   bool
	hookEnv string
}

// slurmStart starts a cluster and registers its teardown.
func slurmStart(t *testing.T, criu string, o slurmOpts) *slurmCluster {
	t.Helper()
	// Users' commands (sbatch, scontrol in their jobs) read slurm.conf.
	dir := slurmJobDir(t)
	c := &slurmCluster{dir: dir, conf: filepath.Join(dir, "slurm.conf"), criu: criu,
		name: fmt.Sprintf("cryo%06d", rand.IntN(1000000))}
	for _, d := range []string{"state", "spool", "log", "etc"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cpus, mem := slurmNodeSize(t)
	ports := slurmFreePorts(t, 2)
	conf := []string{
		"ClusterName=" + c.name,
		"SlurmctldHost=localhost(127.0.0.1)",
		fmt.Sprintf("SlurmctldPort=%d", ports[0]),
		fmt.Sprintf("SlurmdPort=%d", ports[1]),
		"AuthType=auth/none", "CredType=cred/none", "AuthInfo=cred_expire=5",
		"CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
		"SlurmUser=root", "SlurmdUser=root",
		"ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
		"JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
		"SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
		"SchedulerParameters=sched_interval=1,bf_interval=1",
		"MpiDefault=none", "ReturnToService=2", "JobRequeue=1", "KillWait=5", "MailProg=/bin/true",
		// Job IDs of clusters that ever run side by side must differ: the
		// hooks recognise a job's leftover processes by SLURM_JOB_ID.
		fmt.Sprintf("FirstJobId=%d", 100000+rand.IntN(800000)),
		"StateSaveLocation=" + filepath.Join(dir, "state"),
		"SlurmdSpoolDir=" + filepath.Join(dir, "spool"),
		"SlurmctldPidFile=" + filepath.Join(dir, "slurmctld.pid"),
		"SlurmdPidFile=" + filepath.Join(dir, "slurmd.pid"),
		"SlurmctldLogFile=" + filepath.Join(dir, "log", "slurmctld.log"),
		"SlurmdLogFile=" + filepath.Join(dir, "log", "slurmd.log"),
	}
	if o.hooks {
		c.hookLog = filepath.Join(dir, "log", "cryo-hooks.log")
		for _, h := range []string{"cryo-prolog.sh", "cryo-epilog.sh"} {
			b, err := os.ReadFile(filepath.Join(repoRoot(), "contrib", "slurm", h))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "etc", h), b, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		env := fmt.Sprintf("CRYO=%s\nCRYO_SLURM_LOG=%s\n%s\n", bin("cryo"), c.hookLog, o.hookEnv)
		if err := os.WriteFile(filepath.Join(dir, "etc", "cryo-slurm.env"), []byte(env), 0o644); err != nil {
			t.Fatal(err)
		}
		conf = append(conf, "Prolog="+filepath.Join(dir, "etc", "cryo-prolog.sh"), "Epilog="+filepath.Join(dir, "etc", "cryo-epilog.sh"))
	}
	conf = append(conf,
		// Oversubscribed cores: a test may run more jobs at once than the
		// machine has cores; they mostly sleep.
		fmt.Sprintf("NodeName=localhost CPUs=%d RealMemory=%d State=UNKNOWN", cpus, mem),
		"PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
	)
	if err := os.WriteFile(c.conf, []byte(strings.Join(conf, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SLURM_") && !strings.HasPrefix(kv, "CRYO_") && !strings.HasPrefix(kv, "PATH=") {
			c.env = append(c.env, kv)
		}
	}
	c.env = append(c.env, "SLURM_CONF="+c.conf, "CRYO_CRIU="+criu,
		"PATH="+binDir+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	t.Cleanup(func() { c.stop(t) })
	for _, d := range [][]string{{"slurmctld", "-D", "-f", c.conf}, {"slurmd", "-D", "-f", c.conf, "-N", "localhost"}} {
		path, _ := slurmLook(d[0])
		cmd := exec.Command(path, d[1:]...)
		cmd.Env = c.env
		f, err := os.Create(filepath.Join(dir, "log", d[0]+".out"))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = f, f
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			f.Close()
			t.Fatalf("start %s: %v", d[0], err)
		}
		f.Close()
		c.daemons = append(c.daemons, cmd)
		go cmd.Wait()
	}
	t0 := time.Now()
	for {
		out, _ := c.command(t, "sinfo", "-h", "-n", "localhost", "-o", "%T")
		if strings.TrimSpace(out) == "idle" {
			break
		}
		if time.Since(t0) > 30*time.Second {
			t.Fatalf("the Slurm node is not idle after 30 s (sinfo says %q)", strings.TrimSpace(out))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("slurm cluster %s up in %v (%s)", c.name, time.Since(t0).Round(time.Millisecond), dir)
	return c
}

// stop ends the daemons, then every process that still carries the
// cluster's SLURM_CONF in its environment (slurmstepd, job scripts, cryo,
// restored jobs), and shows the logs if the test failed.
func (c *slurmCluster) stop(t *testing.T) {
	for i := len(c.daemons) - 1; i >= 0; i-- {
		d := c.daemons[i]
		_ = d.Process.Signal(syscall.SIGTERM)
		for k := 0; k < 100 && slurmAlive(d.Process.Pid); k++ {
			time.Sleep(50 * time.Millisecond)
		}
		_ = d.Process.Kill()
	}
	for pass := 0; pass < 2; pass++ {
		for _, pid := range slurmPidsWithEnv("SLURM_CONF=" + c.conf) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if t.Failed() {
		for _, f := range []string{"log/slurmctld.log", "log/slurmd.log", "log/cryo-hooks.log"} {
			if b, err := os.ReadFile(filepath.Join(c.dir, f)); err == nil {
				t.Logf("---- %s (last 40 lines)\n%s", f, slurmTail(string(b), 40))
			}
		}
	}
}

func slurmAlive(pid int) bool {
	s := procState(pid)
	return s != 0 && s != 'Z' && s != 'X'
}

// slurmPidsWithEnv lists the processes whose environment holds kv.
func slurmPidsWithEnv(kv string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil {
			continue
		}
		if slices.ContainsFunc(bytes.Split(env, []byte{0}), func(e []byte) bool { return string(e) == kv }) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func slurmTail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// slurmNodeSize reads the machine's CPUs and memory (MB, a little less
// than there is) as slurmd -C sees them.
func slurmNodeSize(t *testing.T) (int, int) {
	t.Helper()
	path, _ := slurmLook("slurmd")
	out, err := exec.Command(path, "-C").Output()
	if err != nil {
		t.Fatalf("slurmd -C: %v", err)
	}
	cpus, mem := 1, 1000
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "CPUs="); ok {
			cpus, _ = strconv.Atoi(v)
		}
		if v, ok := strings.CutPrefix(f, "RealMemory="); ok {
			m, _ := strconv.Atoi(v)
			mem = max(m*9/10, 100)
		}
	}
	return cpus, mem
}

func slurmFreePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// command runs one of Slurm's commands against the cluster.
func (c *slurmCluster) command(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	path, err := slurmLook(name)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = c.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// must runs one of Slurm's commands and fails the test if it fails.
func (c *slurmCluster) must(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := c.command(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// sbatch writes script as dir/job.sh and submits it from dir, as user
// ("" for root), and returns the job ID.
func (c *slurmCluster) sbatch(t *testing.T, dir, script, user string) string {
	t.Helper()
	path := filepath.Join(dir, "job.sh")
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	sbatch, _ := slurmLook("sbatch")
	argv := []string{sbatch, "--parsable", path}
	if user != "" {
		argv = append([]string{"runuser", "-u", user, "--"}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir, cmd.Env = dir, c.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sbatch: %v\n%s", err, out)
	}
	id, _, _ := strings.Cut(strings.TrimSpace(string(out)), ";")
	t.Logf("submitted job %s from %s", id, dir)
	return id
}

// jobInfo is `scontrol show job` as key=value pairs.
func (c *slurmCluster) jobInfo(t *testing.T, id string) map[string]string {
	t.Helper()
	out, err := c.command(t, "scontrol", "-o", "show", "job", id)
	info := map[string]string{}
	if err != nil {
		return info
	}
	for _, f := range strings.Fields(out) {
		if k, v, ok := strings.Cut(f, "="); ok {
			if _, seen := info[k]; !seen {
				info[k] = v
			}
		}
	}
	return info
}

// waitDone waits until the job has ended for good (not pending or
// running, not being requeued) and returns its last scontrol record.
func (c *slurmCluster) waitDone(t *testing.T, id string, timeout time.Duration) map[string]string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		info := c.jobInfo(t, id)
		switch info["JobState"] {
		case "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED":
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s has not ended after %v: %v", id, timeout, info)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// hold keeps a job that was just requeued from running again, retrying
// while Slurm is still busy requeueing it.
func (c *slurmCluster) hold(t *testing.T, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := c.command(t, "scontrol", "hold", id)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("scontrol hold %s: %v\n%s", id, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// slurmJobDir is a directory to submit from that the job's user can use.
func slurmJobDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	// t.TempDir's parent is private; jobs of other users must get through.
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		_ = os.Chmod(d, 0o755)
	}
	return dir
}

// slurmOutput follows a job's output file and notes when each line
// appeared, for the assertions and the timings.
type slurmOutput struct {
	path string
	mu   sync.Mutex
	ls   []slurmLine
	done chan struct{}
}

type slurmLine struct {
	at   time.Time
	text string
}

func slurmFollow(t *testing.T, path string) *slurmOutput {
	o := &slurmOutput{path: path, done: make(chan struct{})}
	stop := make(chan struct{})
	go func() {
		defer close(o.done)
		var off int64
		var partial []byte
		for {
			if f, err := os.Open(path); err == nil {
				if _, err := f.Seek(off, 0); err == nil {
					b, _ := bufio.NewReader(f).Peek(1 << 20)
					b = append([]byte(nil), b...)
					off += int64(len(b))
					partial = append(partial, b...)
					now := time.Now()
					o.mu.Lock()
					for {
						i := bytes.IndexByte(partial, '\n')
						if i < 0 {
							break
						}
						o.ls = append(o.ls, slurmLine{now, string(partial[:i])})
						partial = partial[i+1:]
					}
					o.mu.Unlock()
				}
				f.Close()
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-o.done
		if t.Failed() {
			b, _ := os.ReadFile(path)
			t.Logf("---- job output %s (without step lines)\n%s", path, slurmNoSteps(string(b)))
		}
	})
	return o
}

func slurmNoSteps(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "step ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// wait returns the first line (from the index'th on) that matches re,
// waiting up to timeout for it.
func (o *slurmOutput) wait(t *testing.T, re string, timeout time.Duration) slurmLine {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(timeout)
	for {
		o.mu.Lock()
		for _, l := range o.ls {
			if rx.MatchString(l.text) {
				o.mu.Unlock()
				return l
			}
		}
		o.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no line matching %q in %s after %v", re, o.path, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// has reports whether a line matching re has appeared.
func (o *slurmOutput) has(re string) bool {
	rx := regexp.MustCompile(re)
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, l := range o.ls {
		if rx.MatchString(l.text) {
			return true
		}
	}
	return false
}

// slurmScript is a batch script that runs memstate under `cryo run`, with
// extra #SBATCH options and cryo flags. It echoes which run of the job it
// is, so that the output shows every start.
func slurmScript(sbatchOpts, cryoFlags string, memArgs []string) string {
	return fmt.Sprintf(`#!/bin/bash
#SBATCH --requeue --open-mode=append --output=job.out %s
echo "batch script: run $((${SLURM_RESTART_COUNT:-0} + 1)) of job $SLURM_JOB_ID"
exec cryo run --requeue %s -- %s %s -delay 100ms
`, sbatchOpts, cryoFlags, bin("memstate"), strings.Join(memArgs, " "))
}

// slurmCheckResult asserts that the job printed the reference result and
// every step exactly once, in order: it resumed where it stopped rather
// than starting over.
func slurmCheckResult(t *testing.T, out string, steps int, want string) progress {
	t.Helper()
	p := readProgress(t, out)
	checkRun(t, "job output", p.steps, 1, steps)
	if p.result != want {
		t.Errorf("job printed result %q, an uninterrupted run prints %q", p.result, want)
	}
	return p
}

// TestSlurmRequeueOnSignal: a job wrapped with `exec cryo run --requeue`
// gets SIGUSR1 (scancel --signal=USR1 --batch), checkpoints, stops,
// requeues itself, is restored when Slurm runs it again, and completes with
// the result of an uninterrupted run, every step printed once (resumed, not
// restarted). Beside it, the same job in the other documented form (cryo in
// the background, the shell forwarding the signal from a trap) does the
// same, and a script that neither execs cryo nor traps the signal is warned.
func TestSlurmRequeueOnSignal(t *testing.T) {
	criu := slurmRequire(t)
	c := slurmStart(t, criu, slurmOpts{})
	memArgs := []string{"-steps", "60", "-mem", "32"}
	want := reference(t, "memstate", memArgs...)
	dir := slurmJobDir(t)
	id := c.sbatch(t, dir, slurmScript("--time=5", "", memArgs), "")
	out := slurmFollow(t, filepath.Join(dir, "job.out"))
	bgDir := slurmJobDir(t)
	bgID := c.sbatch(t, bgDir, fmt.Sprintf(`#!/bin/bash
#SBATCH --requeue --open-mode=append --output=job.out --time=5
echo "batch script: run $((${SLURM_RESTART_COUNT:-0} + 1)) of job $SLURM_JOB_ID"
cryo=
trap '[ -n "$cryo" ] && kill -USR1 "$cryo"' USR1
cryo run --requeue -- %s %s -delay 100ms &
cryo=$!
while kill -0 "$cryo" 2>/dev/null; do
	wait "$cryo"
done
wait "$cryo"
rc=$?
echo "batch script: cryo exited with $rc"
[ "$rc" = 0 ] || exit "$rc"
echo "batch script: post-processing"
`, bin("memstate"), strings.Join(memArgs, " ")), "")
	bgOut := slurmFollow(t, filepath.Join(bgDir, "job.out"))
	naiveDir := slurmJobDir(t)
	naiveID := c.sbatch(t, naiveDir, fmt.Sprintf("#!/bin/bash\n#SBATCH --output=job.out --time=5\ncryo run --requeue -- %s -steps 600 -delay 100ms\n", bin("memstate")), "")
	naiveOut := slurmFollow(t, filepath.Join(naiveDir, "job.out"))

	out.wait(t, `^step 15$`, 60*time.Second)
	sig := time.Now()
	c.must(t, "scancel", "--signal=USR1", "--batch", id)
	out.wait(t, `^cryo: SIGUSR1: checkpoint, stop and requeue the job$`, 30*time.Second)
	stopped := out.wait(t, `^cryo: stopped: checkpointed as generation \d+`, 30*time.Second)
	requeued := out.wait(t, `^cryo: requeued: Slurm job `+id, 30*time.Second)
	bgOut.wait(t, `^step 15$`, 60*time.Second)
	c.must(t, "scancel", "--signal=USR1", "--batch", bgID)
	bgOut.wait(t, `^cryo: requeued: Slurm job `+bgID, 30*time.Second)
	run2 := out.wait(t, `^batch script: run 2 of job `+id, 60*time.Second)
	restored := out.wait(t, `^cryo: restored: generation \d+`, 60*time.Second)
	info := c.waitDone(t, id, 90*time.Second)

	if info["JobState"] != "COMPLETED" || info["ExitCode"] != "0:0" || info["Restarts"] != "1" {
		t.Errorf("job %s ended as %s, exit code %s, after %s restarts; want COMPLETED, 0:0, 1", id, info["JobState"], info["ExitCode"], info["Restarts"])
	}
	p := slurmCheckResult(t, filepath.Join(dir, "job.out"), 60, want)
	if n := strings.Count(strings.Join(p.other, "\n"), "cryo: started:"); n != 1 {
		t.Errorf("cryo started the job %d times, want once (then restored it): %q", n, p.other)
	}
	store := filepath.Join(dir, "cryo-"+id)
	if st, err := cryolib.RunState(store); err != nil || st != "completed" {
		t.Errorf("the job's store %s says %q (%v), want completed", store, st, err)
	}
	if out.has(`^cryo: warning: cryo run is a child of the batch script`) {
		t.Errorf("cryo warned about the batch shell although it was exec'd")
	}

	bgInfo := c.waitDone(t, bgID, 90*time.Second)
	if bgInfo["JobState"] != "COMPLETED" || bgInfo["Restarts"] != "1" {
		t.Errorf("background-form job %s ended as %s after %s restarts; want COMPLETED after 1", bgID, bgInfo["JobState"], bgInfo["Restarts"])
	}
	bp := slurmCheckResult(t, filepath.Join(bgDir, "job.out"), 60, want)
	if got := strings.Join(bp.other, "\n"); strings.Count(got, "batch script: post-processing") != 1 || strings.Contains(got, "cryo: warning:") {
		t.Errorf("background-form job: want post-processing once, after the resumed run, and no warning; it printed %q", bp.other)
	}

	naiveOut.wait(t, `^cryo: warning: cryo run is a child of the batch script, whose shell neither traps nor ignores SIGUSR1`, 60*time.Second)
	c.must(t, "scancel", naiveID)

	took := regexp.MustCompile(`scontrol requeue took (\S+)\)`).FindStringSubmatch(requeued.text)
	t.Logf("timings: checkpoint and stop %v after the signal; requeue done %v after it (scontrol requeue %s); Slurm started run 2 %v after the requeue; "+
		"restore %v (batch script start to restored); job done in %s",
		stopped.at.Sub(sig).Round(time.Millisecond), requeued.at.Sub(sig).Round(time.Millisecond), took[len(took)-1],
		run2.at.Sub(requeued.at).Round(time.Millisecond), restored.at.Sub(run2.at).Round(time.Millisecond), info["RunTime"])
}

// TestSlurmTimeLimitSignal: the real path, sbatch --time=1
// --signal=B:USR1@5: Slurm signals the batch shell, which exec'd cryo,
// before the time limit; the job checkpoints, requeues itself (again, if
// the next run is signalled too) and completes with the right result.
func TestSlurmTimeLimitSignal(t *testing.T) {
	criu := slurmRequire(t)
	c := slurmStart(t, criu, slurmOpts{})
	dir := slurmJobDir(t)
	// 58 s of work: longer than the latest the signal can come (55 s in).
	memArgs := []string{"-steps", "580", "-mem", "16"}
	want := reference(t, "memstate", memArgs...)
	id := c.sbatch(t, dir, slurmScript("--time=1 --signal=B:USR1@5", "", memArgs), "")
	out := slurmFollow(t, filepath.Join(dir, "job.out"))

	run1 := out.wait(t, `^batch script: run 1 of job `+id, 60*time.Second)
	sig := out.wait(t, `^cryo: SIGUSR1: checkpoint, stop and requeue the job$`, 90*time.Second)
	stopped := out.wait(t, `^cryo: stopped: checkpointed`, 30*time.Second)
	requeued := out.wait(t, `^cryo: requeued: Slurm job `+id, 30*time.Second)
	run2 := out.wait(t, `^batch script: run 2 of job `+id, 60*time.Second)
	restored := out.wait(t, `^cryo: restored: generation \d+`, 60*time.Second)
	info := c.waitDone(t, id, 150*time.Second)

	restarts, _ := strconv.Atoi(info["Restarts"])
	if info["JobState"] != "COMPLETED" || info["ExitCode"] != "0:0" || restarts < 1 {
		t.Errorf("job %s ended as %s, exit code %s, after %s restarts; want COMPLETED, 0:0, >= 1", id, info["JobState"], info["ExitCode"], info["Restarts"])
	}
	if out.has(`TIME LIMIT`) {
		t.Errorf("the job hit its time limit; the signal should have stopped it before")
	}
	slurmCheckResult(t, filepath.Join(dir, "job.out"), 580, want)
	t.Logf("timings: USR1 came %v into run 1 (--time=1 --signal=B:USR1@5); checkpoint and stop took %v, requeue done %v after the signal; "+
		"Slurm started run 2 %v after the requeue; restore %v; %d requeues in all",
		sig.at.Sub(run1.at).Round(time.Second), stopped.at.Sub(sig.at).Round(time.Millisecond), requeued.at.Sub(sig.at).Round(time.Millisecond),
		run2.at.Sub(requeued.at).Round(time.Millisecond), restored.at.Sub(run2.at).Round(time.Millisecond), restarts)
}

// slurmHistory reads <store>/slurm/history.jsonl.
type slurmHistoryLine struct {
	Hook     string `json:"hook"`
	RunState string `json:"run_state"`
	Why      string `json:"why"`
	Job      struct {
		RestartCount int    `json:"restart_count"`
		Node         string `json:"node"`
		User         string `json:"user"`
	} `json:"job"`
}

func slurmHistory(t *testing.T, store string) []slurmHistoryLine {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(store, "slurm", "history.jsonl"))
	if err != nil {
		t.Fatalf("history: %v", err)
	}
	var hs []slurmHistoryLine
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var h slurmHistoryLine
		if err := json.Unmarshal([]byte(l), &h); err != nil {
			t.Fatalf("history line %q: %v", l, err)
		}
		hs = append(hs, h)
	}
	return hs
}

// TestSlurmPrologEpilog runs contrib/slurm's Prolog and Epilog (as
// slurm.conf's Prolog= and Epilog=, with no PATH, as root):
//   - a job of user nobody finds its store made for it, owned by nobody,
//     0700, with node recorded; it completes, and the epilog deletes the
//     unused store;
//   - a job of nobody submitted from a directory nobody does not own gets
//     no store, but the prolog exits 0: the job runs and the node is not
//     drained;
//   - a `cryo run --requeue` job is signalled and requeued: the epilog of
//     that run ends a process the run left behind and removes staging
//     leftovers, keeps the checkpoint, the job resumes from it, and once it
//     has completed the epilog deletes its store.
func TestSlurmPrologEpilog(t *testing.T) {
	criu := slurmRequire(t)
	plant := filepath.Join(t.TempDir(), "plant")
	// The test's addition to the hooks' settings: when asked to, the epilog
	// first leaves what a killed cryo or a failed restore leaves behind: a
	// process of the job, reparented to init, and a staging directory.
	hookEnv := fmt.Sprintf(`if [ "$SLURM_SCRIPT_CONTEXT" = epilog_slurmd ] && [ -f %[1]s-$SLURM_JOB_ID ]; then
	rm -f %[1]s-$SLURM_JOB_ID
	mkdir -p "$SLURM_JOB_WORK_DIR/cryo-$SLURM_JOB_ID/staging/cryo-work-left-behind"
	( setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! >%[1]s-$SLURM_JOB_ID.orphan )
fi`, plant)
	c := slurmStart(t, criu, slurmOpts{hooks: true, hookEnv: hookEnv})

	// A job of nobody, in nobody's directory.
	mine := slurmJobDir(t)
	if err := os.Chown(mine, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	idA := c.sbatch(t, mine, `#!/bin/sh
#SBATCH --output=job.out
s=cryo-$SLURM_JOB_ID
echo "id: $(id -un)"
echo "store: $(stat -c '%U %a' "$s")"
[ -f "$s/cryo-store.json" ] && echo "store is a cryo store"
cat "$s/slurm/history.jsonl"
`, "nobody")
	// A job of nobody, in a directory of root's.
	theirs := slurmJobDir(t)
	if err := os.Chmod(theirs, 0o777); err != nil {
		t.Fatal(err)
	}
	idB := c.sbatch(t, theirs, "#!/bin/sh\n#SBATCH --output=job.out\necho ran\n", "nobody")
	// A cryo job of root's.
	dirC := slurmJobDir(t)
	memArgs := []string{"-steps", "50", "-mem", "16"}
	want := reference(t, "memstate", memArgs...)
	idC := c.sbatch(t, dirC, slurmScript("--time=5", "", memArgs), "")
	outC := slurmFollow(t, filepath.Join(dirC, "job.out"))

	infoA := c.waitDone(t, idA, 60*time.Second)
	b, _ := os.ReadFile(filepath.Join(mine, "job.out"))
	outA := string(b)
	if infoA["JobState"] != "COMPLETED" {
		t.Errorf("nobody's job ended as %s: %s", infoA["JobState"], outA)
	}
	for _, w := range []string{"id: nobody\n", "store: nobody 700\n", "store is a cryo store\n", `"hook":"prolog"`, `"node":"localhost"`, `"user":"nobody"`} {
		if !strings.Contains(outA, w) {
			t.Errorf("nobody's job did not see %q; its output:\n%s", w, outA)
		}
	}
	slurmWaitGone(t, filepath.Join(mine, "cryo-"+idA), 20*time.Second, "the epilog did not delete the unused store of nobody's completed job")

	infoB := c.waitDone(t, idB, 60*time.Second)
	if infoB["JobState"] != "COMPLETED" {
		t.Errorf("the job whose store could not be prepared ended as %s; the prolog must not fail it", infoB["JobState"])
	}
	if _, err := os.Lstat(filepath.Join(theirs, "cryo-"+idB)); err == nil {
		t.Errorf("the prolog made a store for nobody in a directory of root's")
	}
	if st, _ := c.command(t, "sinfo", "-h", "-n", "localhost", "-o", "%T"); strings.TrimSpace(st) != "idle" && strings.TrimSpace(st) != "mixed" && strings.TrimSpace(st) != "allocated" {
		t.Errorf("node is %q after a prolog that could not prepare a store; it must not be drained", strings.TrimSpace(st))
	}

	// The cryo job: signal it once it is under way, with the epilog asked to
	// plant leftovers first.
	storeC := filepath.Join(dirC, "cryo-"+idC)
	outC.wait(t, `^step 10$`, 60*time.Second)
	if st, err := os.Stat(storeC); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("the cryo job's store %s: %v, mode %v; want 0700", storeC, err, st.Mode().Perm())
	}
	if err := os.WriteFile(plant+"-"+idC, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c.must(t, "scancel", "--signal=USR1", "--batch", idC)
	outC.wait(t, `^cryo: requeued: Slurm job `+idC, 30*time.Second)
	outC.wait(t, `^cryo: restored: generation \d+`, 60*time.Second)
	b, err := os.ReadFile(plant + "-" + idC + ".orphan")
	if err != nil {
		t.Fatalf("the epilog did not plant its leftovers: %v", err)
	}
	orphan, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if orphan <= 0 || alive(orphan) {
		t.Errorf("the process the job left behind (pid %d) still runs after the epilog", orphan)
	}
	if _, err := os.Stat(filepath.Join(storeC, "staging", "cryo-work-left-behind")); err == nil {
		t.Errorf("the epilog left the staging leftover in place")
	}
	hs := slurmHistory(t, storeC)
	var got []string
	for _, h := range hs {
		got = append(got, fmt.Sprintf("%s/%d/%s/%s", h.Hook, h.Job.RestartCount, h.Job.Node, h.RunState))
	}
	if want := []string{"prolog/0/localhost/", "epilog/1/localhost/stopped", "prolog/1/localhost/"}; !slices.Equal(got, want) {
		t.Errorf("store history (hook/restart/node/state) is %q, want %q", got, want)
	}
	infoC := c.waitDone(t, idC, 60*time.Second)
	if infoC["JobState"] != "COMPLETED" || infoC["Restarts"] != "1" {
		t.Errorf("the cryo job ended as %s after %s restarts; want COMPLETED after 1", infoC["JobState"], infoC["Restarts"])
	}
	slurmCheckResult(t, filepath.Join(dirC, "job.out"), 50, want)
	slurmWaitGone(t, storeC, 20*time.Second, "the epilog did not delete the store of the completed cryo job")

	log, _ := os.ReadFile(c.hookLog)
	for _, w := range []string{
		"prolog: created store " + filepath.Join(mine, "cryo-"+idA),
		"epilog: removed store " + filepath.Join(mine, "cryo-"+idA) + " (cryo run never ran in this store)",
		"no store prepared there",
		fmt.Sprintf("ended leftover processes %d (sleep)", orphan),
		"removed 1 staging leftovers",
		"kept store " + storeC + " (the run is unfinished (state stopped)",
		"epilog: removed store " + storeC + " (the job completed successfully)",
	} {
		if !strings.Contains(string(log), w) {
			t.Errorf("the hooks' log does not say %q", w)
		}
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("hooks' log:\n%s", log)
	}
}

func slurmWaitGone(t *testing.T, path string, timeout time.Duration, msg string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Lstat(path); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: %s still exists after %v", msg, path, timeout)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// slurmCorrupt flips bytes in the middle of the page chunks of generation
// gen of the store (keeping their size, so only the checksum can tell):
// those no older generation shares, or with all, every one not in done
// (flipping a chunk twice would mend it).
func slurmCorrupt(t *testing.T, store string, gen int, all bool, done map[string]bool) int {
	t.Helper()
	older := map[string]bool{}
	if !all {
		for g := 1; g < gen; g++ {
			if _, err := os.Stat(filepath.Join(store, "checkpoints", strconv.Itoa(g))); err != nil {
				continue
			}
			for _, f := range manifest(t, store, g).Files {
				for _, c := range f.Chunks {
					older[c.Hash] = true
				}
			}
		}
	}
	n := 0
	for _, f := range manifest(t, store, gen).Files {
		if f.Kind != "pages" {
			continue
		}
		for _, c := range f.Chunks {
			if c.Zero || older[c.Hash] || done[c.Hash] {
				continue
			}
			done[c.Hash] = true
			for _, at := range blobsOf(t, store, c.Hash) { // in its pack
				if at.end-at.off < 16 {
					continue
				}
				b := readFile(t, at.pack)
				for i := (at.off + at.end) / 2; i < (at.off+at.end)/2+8; i++ {
					b[i] ^= 0xff
				}
				writeFile(t, at.pack, b)
				n++
			}
		}
	}
	if n == 0 {
		t.Fatalf("found no chunk of generation %d of %s to corrupt", gen, store)
	}
	return n
}

// TestSlurmCorruptCheckpoint: the checkpoint a requeued job would resume
// from is damaged while the job waits to run again (the job is held, its
// chunks are corrupted, it is released). Three jobs:
//   - newest generation damaged: cryo says so, falls back to the previous
//     generation and completes with the right result;
//   - every generation damaged: the job fails, saying the checkpoints are
//     corrupt, and prints no result;
//   - every generation damaged, with --start-over: cryo says it starts over
//     and completes with the right result.
//
// Never a wrong result.
func TestSlurmCorruptCheckpoint(t *testing.T) {
	criu := slurmRequire(t)
	c := slurmStart(t, criu, slurmOpts{})
	memArgs := []string{"-steps", "60", "-mem", "16"}
	want := reference(t, "memstate", memArgs...)

	type tc struct {
		name, flags string
		all         bool
		dir, id     string
		out         *slurmOutput
	}
	cases := []*tc{
		{name: "newest damaged", flags: "--interval 1s --keep 5"},
		{name: "all damaged", flags: "--interval 1s --keep 5 --max-restarts 1", all: true},
		{name: "all damaged, --start-over", flags: "--interval 1s --keep 5 --start-over", all: true},
	}
	for _, k := range cases {
		k.dir = slurmJobDir(t)
		k.id = c.sbatch(t, k.dir, slurmScript("--time=5", k.flags, memArgs), "")
		k.out = slurmFollow(t, filepath.Join(k.dir, "job.out"))
	}
	for _, k := range cases {
		k.out.wait(t, `^step 20$`, 60*time.Second)
		c.must(t, "scancel", "--signal=USR1", "--batch", k.id)
	}
	for _, k := range cases {
		stopped := k.out.wait(t, `^cryo: stopped: checkpointed as generation (\d+)`, 30*time.Second)
		k.out.wait(t, `^cryo: requeued: Slurm job `+k.id, 30*time.Second)
		c.hold(t, k.id)
		gen, _ := strconv.Atoi(regexp.MustCompile(`generation (\d+)`).FindStringSubmatch(stopped.text)[1])
		store := filepath.Join(k.dir, "cryo-"+k.id)
		gens := []int{gen}
		if k.all {
			gens = nil
			ls, err := cryolib.List(context.Background(), store)
			if err != nil {
				t.Fatal(err)
			}
			for _, g := range ls {
				gens = append(gens, g.Number)
			}
		} else if gen < 2 {
			t.Fatalf("%s: only generation %d before the stop; the test needs an older one to fall back on", k.name, gen)
		}
		n, done := 0, map[string]bool{}
		for _, g := range gens {
			n += slurmCorrupt(t, store, g, k.all, done)
		}
		t.Logf("%s: damaged %d chunks of generations %v of %s", k.name, n, gens, store)
		c.must(t, "scontrol", "release", k.id)
	}

	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			info := c.waitDone(t, k.id, 90*time.Second)
			out := filepath.Join(k.dir, "job.out")
			b, _ := os.ReadFile(out)
			text := string(b)
			p := readProgress(t, out)
			switch k.name {
			case "newest damaged":
				if info["JobState"] != "COMPLETED" {
					t.Errorf("ended as %s; want COMPLETED", info["JobState"])
				}
				if !regexp.MustCompile(`(?m)^cryo: restore-failed: generation \d+: .*corrupt`).MatchString(text) {
					t.Errorf("cryo did not say that the newest generation is corrupt")
				}
				if !regexp.MustCompile(`(?m)^cryo: restored: generation \d+`).MatchString(text) {
					t.Errorf("cryo did not restore an older generation")
				}
				if p.result != want {
					t.Errorf("result %q, want %q", p.result, want)
				}
				// Steps after the older generation ran twice; none is missing.
				if len(p.steps) == 0 || p.steps[len(p.steps)-1] != 60 || slices.Max(p.steps) != 60 {
					t.Errorf("steps %s do not end at 60", compact(p.steps))
				}
			case "all damaged":
				if info["JobState"] != "FAILED" {
					t.Errorf("ended as %s; want FAILED", info["JobState"])
				}
				if p.result != "" {
					t.Errorf("printed a result (%q) from damaged checkpoints", p.result)
				}
				if !strings.Contains(text, "no generation restores") || !regexp.MustCompile(`generation \d+ is corrupt: pages-\d+\.img: chunk \d+`).MatchString(text) {
					t.Errorf("cryo did not say clearly that no checkpoint restores because they are corrupt")
				}
			default:
				if info["JobState"] != "COMPLETED" {
					t.Errorf("ended as %s; want COMPLETED", info["JobState"])
				}
				if !regexp.MustCompile(`(?m)^cryo: no checkpoint in .* is intact \(generation \d+: .*\): starting the job over from the beginning \(--start-over\)$`).MatchString(text) {
					t.Errorf("cryo did not say that it starts over")
				}
				if p.result != want {
					t.Errorf("result %q, want %q", p.result, want)
				}
				if ones := len(slices.DeleteFunc(slices.Clone(p.steps), func(s int) bool { return s != 1 })); ones < 2 {
					t.Errorf("steps %s: the job did not start over", compact(p.steps))
				}
			}
			if t.Failed() {
				t.Logf("output:\n%s", slurmNoSteps(text))
			}
		})
	}
}

// TestSlurmRequeueAsUser: the sbatch recipe of docs/slurm.md for an HPC
// user who is not root, with nothing but cryo and its CRIU (no sudo, no
// daemon): the batch job, the user's, gets SIGUSR1, checkpoints, stops,
// requeues itself and is restored by its next run, which completes with
// the result of an uninterrupted run; the restored job runs as the user,
// and the store is the user's.
func TestSlurmRequeueAsUser(t *testing.T) {
	criu := slurmRequire(t)
	_, u := requireUser(t)
	c := slurmStart(t, criu, slurmOpts{})
	memArgs := []string{"-steps", "60", "-mem", "32"}
	want := reference(t, "memstate", memArgs...)
	dir := u.dir(t)
	id := c.sbatch(t, dir, slurmScript("--time=5", "", memArgs), u.name)
	out := slurmFollow(t, filepath.Join(dir, "job.out"))
	out.wait(t, `^step 15$`, 60*time.Second)
	c.must(t, "scancel", "--signal=USR1", "--batch", id)
	out.wait(t, `^cryo: stopped: checkpointed as generation \d+`, 30*time.Second)
	out.wait(t, `^cryo: requeued: Slurm job `+id, 30*time.Second)
	out.wait(t, `^cryo: restored: generation \d+`, 90*time.Second)
	for _, p := range allMemstates(t) {
		if got := readUserProcess(t, p); !strings.HasPrefix(got.uids, strconv.Itoa(u.uid)+" ") || got.capEff != "0000000000000000" {
			t.Errorf("the restored job's pid %d has uids %q, capabilities %s; want the user's own and none", p, got.uids, got.capEff)
		}
	}
	info := c.waitDone(t, id, 90*time.Second)
	if info["JobState"] != "COMPLETED" || info["ExitCode"] != "0:0" || info["Restarts"] != "1" {
		t.Errorf("the user's job %s ended as %s, exit code %s, after %s restarts; want COMPLETED, 0:0, 1", id, info["JobState"], info["ExitCode"], info["Restarts"])
	}
	p := slurmCheckResult(t, filepath.Join(dir, "job.out"), 60, want)
	if n := strings.Count(strings.Join(p.other, "\n"), "cryo: started:"); n != 1 {
		t.Errorf("cryo started the user's job %d times, want once (then restored it): %q", n, p.other)
	}
	var s syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "cryo-"+id, "cryo-store.json"), &s); err != nil || int(s.Uid) != u.uid {
		t.Errorf("the job's store is not the user's: uid %d, %v", s.Uid, err)
	}
}
