package e2e

import (
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// A workload as the kill-and-restore test runs it.
type workloadCase struct {
	name string
	// args returns the workload's flags (all but -delay); dir is a private
	// directory for its files.
	args func(dir string) []string
	// procs is the number of processes of its tree; threaded says its root
	// must come back with more than one thread.
	procs    int
	threaded bool
}

const (
	jobSteps  = 60
	jobDelay  = "30ms"
	stepFirst = 10 // checkpoint once the job printed this step
)

var killRestoreCases = []workloadCase{
	{name: "memstate", procs: 1, threaded: true, args: func(string) []string {
		return []string{"-steps", strconv.Itoa(jobSteps), "-mem", "8"}
	}},
	{name: "tree", procs: 2, threaded: true, args: func(string) []string {
		return []string{"-steps", strconv.Itoa(jobSteps), "-rec", "4096"}
	}},
	{name: "files", procs: 1, args: func(dir string) []string {
		return []string{"-steps", strconv.Itoa(jobSteps), "-dir", dir}
	}},
	{name: "tcp", procs: 2, args: func(string) []string {
		return []string{"-steps", strconv.Itoa(jobSteps)}
	}},
}

// TestKillRestore is the main promise of cryo: a job checkpointed with
// --kill and restored finishes with the same result as a run that was never
// interrupted, continuing from the step where it was checkpointed.
func TestKillRestore(t *testing.T) {
	criu := requireCRIU(t)
	for _, w := range killRestoreCases {
		t.Run(w.name, func(t *testing.T) { testKillRestore(t, criu, w) })
	}
}

func testKillRestore(t *testing.T, criu string, w workloadCase) {
	want := reference(t, w.name, w.args(t.TempDir())...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, w.name, out, false, append(w.args(t.TempDir()), "-delay", jobDelay)...)
	waitStep(t, out, stepFirst, 30*time.Second)

	r := cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid))
	if r.code != 0 {
		if reason := knownCRIULimit(r.stderr); reason != "" {
			// cryo must leave a job it failed to checkpoint running, untouched.
			if j.exited() {
				t.Errorf("the job died when its checkpoint failed\n%s", r)
			}
			j.waitExit(t, time.Minute)
			p := readProgress(t, out)
			checkRun(t, "job whose checkpoint failed", p.steps, 1, jobSteps)
			if p.result != want {
				t.Errorf("job whose checkpoint failed finished with %q, want %q", p.result, want)
			}
			skipOrFail(t, reason)
		}
		t.Fatalf("checkpoint --kill failed: %s", r)
	}
	if !strings.Contains(r.stdout, "generation 1 ") || !strings.Contains(r.stdout, "job stopped") {
		t.Errorf("checkpoint output does not report generation 1 and the stop: %s", r.stdout)
	}

	// The job is gone, every process of it, and was killed rather than
	// allowed to finish.
	j.waitExit(t, 10*time.Second)
	if ws, ok := j.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("job ended with %v, want killed by SIGKILL", j.cmd.ProcessState)
	}
	m := manifest(t, st, 1)
	if m.Job.RootPID != j.pid || len(m.Job.Processes) != w.procs {
		t.Fatalf("manifest: root %d with %d processes, want root %d with %d", m.Job.RootPID, len(m.Job.Processes), j.pid, w.procs)
	}
	killAtEnd(t, pidsOf(m)...)
	// Like criu dump, checkpoint --kill returns once every process of the
	// job has its SIGKILL; none may run on (zombies waiting for a slow
	// reaper are dead).
	waitEnded(t, 5*time.Second, pidsOf(m)...)
	at := readProgress(t, out)
	if at.result != "" || len(at.other) > 0 || at.last() < stepFirst || at.last() >= jobSteps {
		t.Fatalf("after the checkpoint the output ends at step %d, result %q, other %q; want a step in %d..%d",
			at.last(), at.result, at.other, stepFirst, jobSteps-1)
	}
	checkRun(t, "output when checkpointed", at.steps, 1, at.last())

	r = cryo(t, criu, "restore", "--store", st)
	if r.code != 0 {
		t.Fatalf("restore failed: %s", r)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil || pid != j.pid {
		t.Fatalf("restore printed %q, want the job's pid %d", r.stdout, j.pid)
	}
	// The whole tree is back, with its parent links and threads.
	for _, p := range m.Job.Processes {
		st, err := proc.ReadStat(p.PID)
		if err != nil {
			t.Errorf("restored process %d (%s): %v", p.PID, p.Comm, err)
			continue
		}
		if p.PID != m.Job.RootPID && st.PPID != p.PPID {
			t.Errorf("restored process %d has parent %d, want %d", p.PID, st.PPID, p.PPID)
		}
		if w.threaded && p.PID == m.Job.RootPID && st.Threads < 2 {
			t.Errorf("restored root %d has %d threads, want several", p.PID, st.Threads)
		}
	}

	waitEnded(t, time.Minute, pidsOf(m)...)
	p := readProgress(t, out)
	if p.result == "" {
		// Tell a job that died early from a wait that ended too soon.
		t.Errorf("restored job printed no result; pid %d is now in state %q", j.pid, procState(j.pid))
	}
	if len(p.other) > 0 {
		t.Errorf("restored job printed %q", p.other)
	}
	// Steps 1..at came from the first run; at+1..jobSteps only from the
	// restored one, each once: it went on from its checkpointed state.
	checkRun(t, "output after restore", p.steps, 1, jobSteps)
	if p.result != want {
		t.Errorf("restored job finished with %q, an uninterrupted run with %q", p.result, want)
	}
}

// knownCRIULimit recognises a checkpoint that failed because of a known
// limitation of the CRIU in use, and says which.
func knownCRIULimit(stderr string) string {
	if strings.Contains(stderr, "Can't get 1:16 opt: Operation not supported") {
		return "this CRIU cannot dump TCP sockets on Linux >= 6.16, which refuses SO_PASSCRED/SO_PASSSEC " +
			"on them (CRIU 4.1.1: \"sockets: Can't get 1:16 opt\"; fixed upstream after 4.1.1, checkpoint-restore/criu#2718)"
	}
	return ""
}

// TestLeaveRunning checkpoints a running job twice without stopping it,
// then kills it and restores the first generation.
func TestLeaveRunning(t *testing.T) {
	criu := requireCRIU(t)
	const steps = 80
	args := []string{"-steps", strconv.Itoa(steps), "-mem", "8"}
	want := reference(t, "memstate", args...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	// Appended output shows the killed run and the restored one one after
	// the other.
	started := time.Now()
	j := startJob(t, "memstate", out, true, append(args, "-delay", jobDelay)...)
	pid := strconv.Itoa(j.pid)

	before1 := waitStep(t, out, 8, 30*time.Second).last()
	r := cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid)
	if r.code != 0 || !strings.Contains(r.stdout, "generation 1 ") || strings.Contains(r.stdout, "stopped") {
		t.Fatalf("checkpoint --leave-running: %s", r)
	}
	after1 := readProgress(t, out).last()
	if j.exited() {
		t.Fatal("the job ended after a --leave-running checkpoint")
	}
	// It goes on.
	before2 := waitStep(t, out, after1+5, 30*time.Second).last()
	r = cryo(t, criu, "checkpoint", "--store", st, pid) // leave-running is the default
	if r.code != 0 || !strings.Contains(r.stdout, "generation 2 ") {
		t.Fatalf("second checkpoint: %s", r)
	}
	if j.exited() {
		t.Fatal("the job ended after the second checkpoint")
	}

	// list --json describes both generations.
	r = cryo(t, "", "list", "--store", st, "--json")
	var gens []struct {
		Generation  int       `json:"generation"`
		Created     time.Time `json:"created"`
		RootPID     int       `json:"root_pid"`
		Processes   int       `json:"processes"`
		RawBytes    int64     `json:"raw_bytes"`
		StoredBytes int64     `json:"stored_bytes"`
		Intact      bool      `json:"intact"`
		Problem     string    `json:"problem"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || r.code != 0 || len(gens) != 2 {
		t.Fatalf("list --json: %v\n%s", err, r)
	}
	for i, g := range gens {
		if g.Generation != i+1 || g.RootPID != j.pid || g.Processes != 1 || !g.Intact || g.Problem != "" ||
			g.RawBytes < 8<<20 || g.StoredBytes <= 0 || g.Created.Before(started.Add(-time.Second)) || g.Created.After(time.Now()) {
			t.Errorf("list --json entry %d: %+v", i, g)
		}
	}
	if gens[1].Created.Before(gens[0].Created) {
		t.Errorf("generation 2 (%v) is older than generation 1 (%v)", gens[1].Created, gens[0].Created)
	}

	j.killTree(t)
	killed := readProgress(t, out).last()
	r = cryo(t, criu, "restore", "--store", st, "--generation", "1")
	if r.code != 0 || strings.TrimSpace(r.stdout) != pid {
		t.Fatalf("restore --generation 1: want pid %s\n%s", pid, r)
	}
	killAtEnd(t, j.pid)
	waitEnded(t, time.Minute, j.pid)

	p := readProgress(t, out)
	if p.result != want || len(p.other) > 0 {
		t.Errorf("restored generation 1 finished with %q (other output %q), an uninterrupted run with %q", p.result, p.other, want)
	}
	// The output is the killed run (1..killed), then the restored one,
	// which resumes right after the step generation 1 was taken at.
	cut := 1
	for cut < len(p.steps) && p.steps[cut] > p.steps[cut-1] {
		cut++
	}
	if cut == len(p.steps) {
		t.Fatalf("output %s shows no restart", compact(p.steps))
	}
	checkRun(t, "killed run", p.steps[:cut], 1, killed)
	resumed := p.steps[cut]
	if resumed-1 < before1 || resumed-1 > after1 {
		t.Errorf("restored run resumed at step %d; generation 1 was taken between steps %d and %d", resumed, before1, after1)
	}
	if resumed-1 >= before2 {
		t.Errorf("restored run resumed at step %d, after generation 2 was started (step %d): restored the wrong generation?", resumed, before2)
	}
	checkRun(t, "restored run", p.steps[cut:], resumed, steps)
}

// TestRestoreRefusesLivePID restores a checkpoint while the job it was
// taken from still runs: the job's PID is taken, so restore must refuse,
// say which PID and why, and leave the running job alone.
func TestRestoreRefusesLivePID(t *testing.T) {
	criu := requireCRIU(t)
	args := []string{"-steps", strconv.Itoa(jobSteps), "-mem", "8"}
	want := reference(t, "memstate", args...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, false, append(args, "-delay", jobDelay)...)
	pid := strconv.Itoa(j.pid)
	waitStep(t, out, 5, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--leave-running", pid); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}

	start := time.Now()
	r := cryo(t, criu, "restore", "--store", st)
	if r.code != 1 || r.stdout != "" || !strings.Contains(r.stderr, "pid "+pid) || !strings.Contains(r.stderr, "live process") {
		t.Errorf("restore while the job runs: want exit 1 naming pid %s as held by a live process\n%s", pid, r)
	}
	// A live holder is refused at once; only a dying one is waited for.
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("refusing took %v", took)
	}
	if logs, _ := filepath.Glob(filepath.Join(st, "logs", "*restore*")); len(logs) > 0 {
		t.Errorf("CRIU ran although the PID is taken: %v", logs)
	}

	// The job was not disturbed: it finishes as if nothing happened.
	j.waitExit(t, time.Minute)
	p := readProgress(t, out)
	checkRun(t, "job output", p.steps, 1, jobSteps)
	if p.result != want || len(p.other) > 0 {
		t.Errorf("job finished with %q (other output %q), want %q", p.result, p.other, want)
	}
}
