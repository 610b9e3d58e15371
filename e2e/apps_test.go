package e2e

import (
	"context"
	"fmt"
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

	"github.com/cryo-hpc/cryo/internal/proc"
)

// Real applications from Debian under cryo run, as HPC users run them:
// LAMMPS, serial and with OpenMPI's mpirun -np 2; an MPI program built
// with MPICH and run by its mpiexec -n 2; a PyTorch training loop on the
// CPU. Each is killed mid-run, a rank and separately the launcher, and
// must finish with the output of an uninterrupted run, printed once: on
// cryo's stdout, in STORE/run/host.out and in the log the job writes
// itself. Their inputs are in testdata/apps. scripts/install-deps.sh
// installs the packages (lammps, openmpi-bin, mpich, libmpich-dev,
// python3-torch).

// app is one application under test.
type app struct {
	name string
	// argv is the job's command line, given the directory holding its
	// inputs (and, for MPICH, the program) and the log it writes itself.
	argv func(in, log string) []string
	env  []string // more environment for the job, as root
	// flags are cryo run's flags the job needs, with the reason.
	flags []string
	// rank is the command name of the job's ranks ("" for a job of one
	// process).
	rank string
	// progress is what starts a line that shows the job's progress.
	progress *regexp.Regexp
	// mask hides what differs between two uninterrupted runs (timings).
	mask func(string) string
}

// lammpsTimings are the lines of LAMMPS's output that report how long it
// took; they differ from run to run, the rest does not.
var lammpsTimings = regexp.MustCompile(`(?m)^(Loop time of .*|Performance: .*|.*% CPU use .*|\S+ +\|.*\|.*|Total wall time: .*|  \S+ CPU = .*)$`)

var numbersAndSpaces = regexp.MustCompile(`[0-9.]+| +`)

func maskLAMMPS(s string) string {
	return lammpsTimings.ReplaceAllStringFunc(s, func(l string) string {
		return numbersAndSpaces.ReplaceAllStringFunc(l, func(m string) string {
			if m[0] == ' ' {
				return " "
			}
			return "#"
		})
	})
}

func sameOutput(s string) string { return s }

// OpenMPI refuses to run as root unless told that is meant.
var ompiAsRoot = []string{"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"}

var thermoRow = regexp.MustCompile(`^ +\d+ +-?\d`)

var apps = map[string]app{
	"lammps": {
		name: "lammps",
		argv: func(in, log string) []string {
			return []string{"lmp", "-in", filepath.Join(in, "melt.in"), "-var", "steps", "12000", "-log", log}
		},
		progress: thermoRow, mask: maskLAMMPS,
	},
	"lammps-openmpi": {
		name: "lammps-openmpi",
		argv: func(in, log string) []string {
			// A node shared with other jobs (as the test machines are) has
			// fewer idle cores than ranks at times: the ranks yield when
			// they wait, rather than spin.
			return []string{"mpirun.openmpi", "-np", "2", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1",
				"lmp", "-in", filepath.Join(in, "melt.in"), "-var", "steps", "10000", "-log", log}
		},
		env: ompiAsRoot, rank: "lmp", progress: thermoRow, mask: maskLAMMPS,
	},
	"mpich": {
		name: "mpich",
		argv: func(in, log string) []string {
			return []string{"mpiexec.mpich", "-n", "2", filepath.Join(in, "ring"), "160", "40", log}
		},
		// MPICH's UCX maps 4 MiB of shared memory that it has unlinked
		// from /dev/shm: more than CRIU keeps of a deleted file unless
		// told (TestAppMPICHNeedsGhostLimit). mpiexec (hydra) reports a
		// rank killed by signal N as exit code N, which no one can tell
		// from the job's own exit(N): its user asks for restarts.
		flags: []string{"--ghost-limit", "16M", "--restart-on-exit"},
		rank:  "ring", progress: regexp.MustCompile(`^step `), mask: sameOutput,
	},
	"pytorch": {
		name: "pytorch",
		argv: func(in, log string) []string {
			return []string{"/usr/bin/python3", filepath.Join(in, "train.py"), "150", "0.04", log}
		},
		progress: regexp.MustCompile(`^step `), mask: sameOutput,
	},
}

// requireApp checks that the application's programs are installed (make
// test installs them: scripts/install-deps.sh) and prepares its inputs.
func requireApp(t *testing.T, a app) {
	t.Helper()
	need := map[string][]string{
		"lammps": {"lmp"}, "lammps-openmpi": {"lmp", "mpirun.openmpi"}, "mpich": {"mpiexec.mpich", "mpicc.mpich"},
		"pytorch": {"/usr/bin/python3"},
	}[a.name]
	for _, p := range need {
		if _, err := exec.LookPath(p); err != nil {
			skipOrFail(t, fmt.Sprintf("%s is not installed (scripts/install-deps.sh installs it): %v", p, err))
		}
	}
	if a.name == "pytorch" {
		if out, err := exec.Command("/usr/bin/python3", "-c", "import torch").CombinedOutput(); err != nil {
			skipOrFail(t, fmt.Sprintf("python3-torch is not installed (scripts/install-deps.sh installs it): %v %s", err, out))
		}
	}
	if a.name == "mpich" {
		buildRing(t)
	}
}

var (
	ringOnce sync.Once
	ringErr  error
)

// buildRing compiles testdata/apps/ring.c with MPICH's mpicc, once.
func buildRing(t *testing.T) {
	t.Helper()
	ringOnce.Do(func() {
		out, err := exec.Command("mpicc.mpich", "-O2", "-o", bin("ring"), filepath.Join(repoRoot(), "e2e", "testdata", "apps", "ring.c")).CombinedOutput()
		if err != nil {
			ringErr = fmt.Errorf("mpicc.mpich ring.c: %v\n%s", err, out)
		}
	})
	if ringErr != nil {
		t.Fatal(ringErr)
	}
}

// appInputs copies the application's inputs into dir (owned by uid and
// gid when they are not -1, as a user's own files) and returns dir.
func appInputs(t *testing.T, dir string, uid, gid int) string {
	t.Helper()
	files := map[string]string{
		"melt.in":  filepath.Join(repoRoot(), "e2e", "testdata", "apps", "melt.in"),
		"train.py": filepath.Join(repoRoot(), "e2e", "testdata", "apps", "train.py"),
		"ring":     bin("ring"),
	}
	for name, src := range files {
		b, err := os.ReadFile(src)
		if err != nil {
			continue // ring is built only for MPICH
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
		if uid >= 0 {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// appOutput is what one run of an application printed and logged.
type appOutput struct{ stdout, log string }

var (
	appRefsMu sync.Mutex
	appRefs   = map[string]appOutput{}
)

// appReference runs the application uninterrupted, without cryo, once
// per test binary: what every interrupted run must print.
func appReference(t *testing.T, a app) appOutput {
	t.Helper()
	appRefsMu.Lock()
	defer appRefsMu.Unlock()
	if ref, ok := appRefs[a.name]; ok {
		return ref
	}
	dir := appInputs(t, t.TempDir(), -1, -1)
	log := filepath.Join(dir, "job.log")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	argv := a.argv(dir, log)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Dir, cmd.Env = dir, append(os.Environ(), a.env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("uninterrupted run of %s: %v\n%s", a.name, err, out)
	}
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	ref := appOutput{stdout: a.mask(string(out)), log: a.mask(string(b))}
	if n := progressLines(a, ref.stdout); n < 20 {
		t.Fatalf("uninterrupted run of %s shows %d progress lines: %q", a.name, n, ref.stdout)
	}
	appRefs[a.name] = ref
	return ref
}

func progressLines(a app, s string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		if a.progress.MatchString(l) {
			n++
		}
	}
	return n
}

// appJob is an application run under cryo run, by root or by the test
// user.
type appJob struct {
	a     app
	r     *runJob
	store string
	dir   string // inputs, and the job's own log
	log   string
	criu  string
	user  *testUser
}

// startApp runs the application under cryo run in the store dir/store,
// its stdout a pipe (so that it goes to STORE/run/host.out and cryo relays
// it), with its inputs and log in dir; as the test user when u is set.
func startApp(t *testing.T, criu string, a app, dir string, u *testUser, flags ...string) *appJob {
	t.Helper()
	j := &appJob{a: a, store: filepath.Join(dir, "store"), dir: dir, log: filepath.Join(dir, "job.log"), criu: criu, user: u}
	args := append(append([]string{"--store", j.store}, a.flags...), flags...)
	args = append(append(args, "--"), a.argv(dir, j.log)...)
	j.r = startRunPrep(t, criu, true, func(c *exec.Cmd) {
		if u != nil {
			u.as(c)
			c.Env = append(c.Env, "CRYO_CRIU="+criu)
		} else {
			c.Env = append(c.Env, a.env...)
		}
		c.Dir = dir
	}, args...)
	return j
}

func (j *appJob) hostOut() string { return filepath.Join(j.store, "run", "host.out") }

// waitProgress waits until host.out shows at least n progress lines and
// returns how many it shows.
func (j *appJob) waitProgress(t *testing.T, n int, timeout time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := progressLines(j.a, string(readOrEmpty(j.hostOut())))
		if got >= n {
			return got
		}
		select {
		case <-j.r.done:
			t.Fatalf("%s ended (exit %d) before showing %d progress lines (it showed %d)\ncryo said:\n%s", j.a.name, j.r.code, n, got, j.r.messages(t))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s showed %d progress lines in %v, want %d\ncryo said:\n%s", j.a.name, got, timeout, n, j.r.messages(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkpoint asks cryo run for a checkpoint (SIGUSR1) and waits for it.
func (j *appJob) checkpoint(t *testing.T, gen int) {
	t.Helper()
	j.r.cmd.Process.Signal(syscall.SIGUSR1)
	j.r.waitFor(t, fmt.Sprintf("checkpoint: generation %d:", gen), time.Minute)
}

// victim is the PID to kill on the node: the launcher (the host tree's
// root), or one of its ranks, the newest.
func (j *appJob) victim(t *testing.T, what string) int {
	t.Helper()
	host := hostPID(t, j.criu, j.store)
	if what == "launcher" || j.a.rank == "" {
		return host
	}
	pids, err := proc.Tree(host)
	if err != nil {
		t.Fatal(err)
	}
	var ranks []int
	for _, p := range pids {
		if st, err := proc.ReadStat(p); err == nil && st.Comm == j.a.rank {
			ranks = append(ranks, p)
		}
	}
	if len(ranks) != 2 {
		t.Fatalf("%s: %d ranks (%s) below the launcher %d, want 2: %v", j.a.name, len(ranks), j.a.rank, host, pids)
	}
	return slices.Max(ranks)
}

// checkOutput asserts that the job printed and logged what an
// uninterrupted run does, once: in host.out, on cryo's stdout (relay; the
// relays of several cryo runs one after another, in order) and in its log.
// With reported, what cryo relayed may hold besides a launcher's report
// of the killed rank, printed before the failure was known (a terminal
// cannot take it back): MPICH's mpiexec prints it to stdout.
func (j *appJob) checkOutput(t *testing.T, reported bool, relays ...*runJob) {
	t.Helper()
	ref := appReference(t, j.a)
	relayed := ""
	for _, r := range append(relays, j.r) {
		relayed += string(readOrEmpty(r.out))
	}
	relayed = j.a.mask(relayed)
	if reported {
		var extra []string
		relayed, extra = besides(relayed, ref.stdout)
		if len(extra) > 0 {
			t.Logf("cryo relayed the launcher's report of the killed rank too:\n%s", strings.Join(extra, "\n"))
		}
	}
	for _, c := range []struct{ what, got, want string }{
		{"STORE/run/host.out", j.a.mask(string(readOrEmpty(j.hostOut()))), ref.stdout},
		{"what cryo relayed to its stdout", relayed, ref.stdout},
		{"the job's own log", j.a.mask(string(readOrEmpty(j.log))), ref.log},
	} {
		if c.got != c.want {
			t.Errorf("%s of %s differs from an uninterrupted run's:\n%s", c.what, j.a.name, firstDiff(c.got, c.want))
		}
	}
}

// besides leaves out of got the lines that want does not have at all, and
// returns them apart.
func besides(got, want string) (string, []string) {
	has := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSuffix(want, "\n"), "\n") {
		has[l] = true
	}
	var keep, extra []string
	for _, l := range strings.Split(strings.TrimSuffix(got, "\n"), "\n") {
		if has[l] {
			keep = append(keep, l+"\n")
		} else {
			extra = append(extra, l)
		}
	}
	return strings.Join(keep, ""), extra
}

// firstDiff shows where two outputs part, by line.
func firstDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl || i >= len(g) || i >= len(w) {
			return fmt.Sprintf("line %d (of %d, want %d):\n  got:  %q\n  want: %q", i+1, len(g), len(w), gl, wl)
		}
	}
	return "(equal)"
}

// killAndRecover kills what (a rank or the launcher) once the job has got
// on past a checkpoint, and checks that cryo brings it back to the same
// end, printed once.
func killAndRecover(t *testing.T, j *appJob, what string) {
	t.Helper()
	at := j.waitProgress(t, 8, 2*time.Minute)
	j.checkpoint(t, 1)
	at = max(at, progressLines(j.a, string(readOrEmpty(j.hostOut()))))
	j.waitProgress(t, at+4, time.Minute)
	pid := j.victim(t, what)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %s (pid %d) at progress line %d of host.out: %v\ncryo said:\n%s", what, pid,
			progressLines(j.a, string(readOrEmpty(j.hostOut()))), err, j.r.messages(t))
	}
	killed := time.Now()
	code := j.r.wait(t, 3*time.Minute)
	msgs := j.r.messages(t)
	t.Logf("%s of %s killed (pid %d); cryo run ended %v later, and said:\n%s", what, j.a.name, pid, time.Since(killed).Round(time.Millisecond), msgs)
	if code != 0 {
		t.Fatalf("cryo run of %s exited %d after its %s was killed, want 0\ncryo said:\n%s", j.a.name, code, what, msgs)
	}
	if !strings.Contains(msgs, "cryo: failure: ") || !strings.Contains(msgs, "restored: generation") {
		t.Errorf("no failure and restore reported for the killed %s:\n%s", what, msgs)
	}
	if strings.Contains(msgs, "not cut back") || strings.Contains(msgs, "warning") {
		t.Errorf("cryo warned:\n%s", msgs)
	}
	j.checkOutput(t, what == "rank")
}

// TestApps: each application, killed mid-run under cryo run (as root), a
// rank and separately the launcher, finishes as an uninterrupted run does.
func TestApps(t *testing.T) {
	criu := requireCRIU(t)
	for _, tc := range []struct{ app, kill string }{
		{"lammps", "process"},
		{"lammps-openmpi", "rank"},
		{"lammps-openmpi", "launcher"},
		{"mpich", "rank"},
		{"mpich", "launcher"},
		{"pytorch", "process"},
	} {
		t.Run(tc.app+"/"+tc.kill+" killed", func(t *testing.T) {
			a := apps[tc.app]
			requireApp(t, a)
			appReference(t, a)
			j := startApp(t, criu, a, appInputs(t, t.TempDir(), -1, -1), nil)
			killAndRecover(t, j, tc.kill)
		})
	}
}

// TestAppsRestoreWhilePIDsAreTaken: an MPI job stopped by cryo run (its
// checkpoint signal) resumes on the same node while unrelated processes
// hold every PID it had there (job-init's, mpirun's, the ranks'): it comes
// back in fresh namespaces, finishes as an uninterrupted run does, and the
// holders are left alone.
func TestAppsRestoreWhilePIDsAreTaken(t *testing.T) {
	criu := requireCRIU(t)
	a := apps["lammps-openmpi"]
	requireApp(t, a)
	restoreWhilePIDsAreTaken(t, criu, a, appInputs(t, t.TempDir(), -1, -1), nil)
}

// TestUserAppsRestoreWhilePIDsAreTaken: the same for a user's MPI job
// (MPICH: a user cannot checkpoint OpenMPI's mpirun), in namespaces the
// user owns; the holders are root's.
func TestUserAppsRestoreWhilePIDsAreTaken(t *testing.T) {
	criu, u := requireUser(t)
	a := apps["mpich"]
	requireApp(t, a)
	restoreWhilePIDsAreTaken(t, criu, a, appInputs(t, u.dir(t), u.uid, u.gid), &u)
}

func restoreWhilePIDsAreTaken(t *testing.T, criu string, a app, dir string, u *testUser) {
	t.Helper()
	appReference(t, a)
	j := startApp(t, criu, a, dir, u, "--namespaces", "on")
	j.waitProgress(t, 8, 2*time.Minute)
	m := jobInitRE.FindStringSubmatch(j.r.messages(t))
	if m == nil {
		t.Fatalf("no job-init pid in %q", j.r.messages(t))
	}
	init, _ := strconv.Atoi(m[1])
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", init))
	if err != nil {
		t.Fatal(err)
	}
	old := namespaceMembers(t, ns)
	if len(old) < 4 {
		t.Fatalf("the job has %d processes on the node (%v), want job-init, the launcher and 2 ranks at least", len(old), old)
	}
	j.r.cmd.Process.Signal(syscall.SIGTERM)
	if code := j.r.wait(t, time.Minute); code != 143 {
		t.Fatalf("stop: exit %d, want 143\n%s", code, j.r.messages(t))
	}
	waitEnded(t, 10*time.Second, old...)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if !slices.ContainsFunc(old, func(p int) bool { return procState(p) != 0 }) {
			break // reaped
		}
	}
	var holders []*exec.Cmd
	for _, pid := range old {
		h := takePID(t, pid, "sleep", "300")
		holders = append(holders, h)
		t.Cleanup(func() { h.Process.Kill(); h.Wait() })
	}
	first := j.r
	j.r = startApp(t, criu, a, dir, u, "--namespaces", "on").r
	if code := j.r.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("the resumed job exited %d, want 0\ncryo said:\n%s", code, j.r.messages(t))
	}
	if !strings.Contains(j.r.messages(t), "restored: generation 1") {
		t.Errorf("the second cryo run did not resume from generation 1:\n%s", j.r.messages(t))
	}
	for _, h := range holders {
		if !alive(h.Process.Pid) {
			t.Errorf("cryo ended pid %d, which held one of the job's old PIDs", h.Process.Pid)
		}
	}
	j.checkOutput(t, false, first)
}

// TestAppMPICHNeedsGhostLimit: MPICH (through UCX) maps shared memory it
// has unlinked from the job's /dev/shm, 4 MiB of it, more than CRIU keeps
// of a deleted file by default. Without --ghost-limit the checkpoint fails
// in one line that names the flag (and the job goes on to its normal end);
// with it, or the same limit in a --criu-config file, the same job is
// checkpointed.
func TestAppMPICHNeedsGhostLimit(t *testing.T) {
	criu := requireCRIU(t)
	a := apps["mpich"]
	requireApp(t, a)
	ref := appReference(t, a)
	without := a
	without.flags = nil
	j := startApp(t, criu, without, appInputs(t, t.TempDir(), -1, -1), nil)
	j.waitProgress(t, 5, 2*time.Minute)
	j.r.cmd.Process.Signal(syscall.SIGUSR1)
	j.r.waitFor(t, "checkpoint-failed: ", time.Minute)
	msgs := j.r.messages(t)
	if !strings.Contains(msgs, "Can't dump ghost file /dev/shm/") || !strings.Contains(msgs, "--ghost-limit raises it") {
		t.Errorf("the failed checkpoint does not say it was the ghost limit and how to raise it:\n%s", msgs)
	}
	if code := j.r.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("the job whose checkpoint failed exited %d\n%s", code, j.r.messages(t))
	}
	if got := string(readOrEmpty(j.hostOut())); got != ref.stdout {
		t.Errorf("the job whose checkpoint failed printed other than an uninterrupted run:\n%s", firstDiff(got, ref.stdout))
	}

	// With the flag, or with the same limit in a CRIU configuration file
	// (--criu-config, CRIU's own syntax), the job is checkpointed.
	conf := filepath.Join(t.TempDir(), "criu.conf")
	if err := os.WriteFile(conf, []byte("# for MPICH's shared memory\nghost-limit 16M\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, flags := range [][]string{{"--ghost-limit", "16M"}, {"--criu-config", conf}} {
		j = startApp(t, criu, without, appInputs(t, t.TempDir(), -1, -1), nil, flags...)
		j.waitProgress(t, 5, 2*time.Minute)
		j.checkpoint(t, 1)
		j.r.cmd.Process.Signal(syscall.SIGTERM)
		if code := j.r.wait(t, time.Minute); code != 143 {
			t.Errorf("%v: stop after the checkpoint: exit %d, want 143\n%s", flags, code, j.r.messages(t))
		}
	}
}

// TestUserApps: the applications run by a user who is not root under
// cryo run (CRIU as the user; the job in namespaces the user owns), killed
// mid-run, a rank and separately the launcher, finish as an uninterrupted
// run does. (OpenMPI's mpirun cannot be checkpointed by a user:
// TestUserOpenMPILauncherHoldsTCPConnections.)
func TestUserApps(t *testing.T) {
	criu, u := requireUser(t)
	for _, tc := range []struct{ app, kill string }{
		{"lammps", "process"}, // an OpenMPI singleton: cryo run isolates it
		{"mpich", "rank"},
		{"mpich", "launcher"},
		{"pytorch", "process"},
	} {
		t.Run(tc.app+"/"+tc.kill+" killed", func(t *testing.T) {
			a := apps[tc.app]
			requireApp(t, a)
			appReference(t, a)
			j := startApp(t, criu, a, appInputs(t, u.dir(t), u.uid, u.gid), &u)
			killAndRecover(t, j, tc.kill)
		})
	}
}

// TestUserOpenMPILauncherHoldsTCPConnections: what user mode cannot do
// yet. OpenMPI's mpirun talks to its ranks over TCP on loopback (PMIx 4
// has no other way); checkpointing a TCP connection needs TCP repair, that
// is CAP_NET_ADMIN, which a user's CRIU does not have (docs/security.md).
// cryo says so in one line naming the process and the connection, before
// dumping anything, and the job runs on to its normal end. A network
// namespace of the job's own, which the user would own, would lift this.
func TestUserOpenMPILauncherHoldsTCPConnections(t *testing.T) {
	criu, u := requireUser(t)
	a := apps["lammps-openmpi"]
	requireApp(t, a)
	ref := appReference(t, a)
	j := startApp(t, criu, a, appInputs(t, u.dir(t), u.uid, u.gid), &u)
	j.waitProgress(t, 5, 2*time.Minute)
	j.r.cmd.Process.Signal(syscall.SIGUSR1)
	j.r.waitFor(t, "checkpoint-failed: ", time.Minute)
	var line string
	for _, l := range strings.Split(j.r.messages(t), "\n") {
		if strings.Contains(l, "checkpoint-failed: ") {
			line = l
			break
		}
	}
	if !strings.Contains(line, "has a TCP connection") || !strings.Contains(line, "CAP_NET_ADMIN") || !strings.Contains(line, "127.0.0.1:") {
		t.Errorf("the refusal does not name the TCP connection and why:\n%s", line)
	}
	if code := j.r.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("the job whose checkpoint was refused exited %d\n%s", code, j.r.messages(t))
	}
	if got := j.a.mask(string(readOrEmpty(j.hostOut()))); got != ref.stdout {
		t.Errorf("the job whose checkpoint was refused printed other than an uninterrupted run:\n%s", firstDiff(got, ref.stdout))
	}
	if gens, _ := filepath.Glob(filepath.Join(j.store, "checkpoints", "*", "manifest.json")); len(gens) > 0 {
		t.Errorf("a refused checkpoint left generations: %v", gens)
	}
}
