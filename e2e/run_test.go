package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// The monitor's tests: a host streams work items to an offload worker over
// a socket (e2e/workloads/offload), both trees under one `cryo run`.

var (
	offloadOnce sync.Once
	offloadErr  error
)

func buildOffload(t *testing.T) {
	t.Helper()
	offloadOnce.Do(func() {
		cmd := exec.Command("go", "build", "-buildvcs=false", "-o", bin("offload"), "./e2e/workloads/offload")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			offloadErr = fmt.Errorf("go build offload: %v\n%s", err, out)
		}
	})
	if offloadErr != nil {
		t.Fatal(offloadErr)
	}
}

// offloadReference runs host and worker directly, without cryo, and
// returns the host's result line.
func offloadReference(t *testing.T, items int) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "ref.sock")
	w := exec.Command(bin("offload"), "-role", "worker", "-addr", sock)
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer w.Wait()
	out, err := exec.Command(bin("offload"), "-role", "host", "-addr", sock, "-items", fmt.Sprint(items), "-delay", "0").Output()
	if err != nil {
		t.Fatalf("reference run: %v", err)
	}
	p := strings.TrimSpace(string(out))
	return p[strings.LastIndex(p, "\n")+1:]
}

// runJob is one `cryo run`: the host's output (cryo's stdout, a file) and
// cryo's own messages.
type runJob struct {
	cmd      *exec.Cmd
	out, err string
	done     chan struct{}
	code     int
}

func startRun(t *testing.T, criu string, args ...string) *runJob {
	t.Helper()
	return startRunWith(t, criu, false, args...)
}

// startRunWith is startRun; with pipe, cryo's stdout is a pipe (as on a
// terminal), so the host writes STORE/run/host.out and cryo relays it: out
// is then what cryo's stdout showed.
func startRunWith(t *testing.T, criu string, pipe bool, args ...string) *runJob {
	t.Helper()
	return startRunPrep(t, criu, pipe, nil, args...)
}

// startRunEnv is startRunWith with env added to cryo's environment.
func startRunEnv(t *testing.T, criu string, env []string, pipe bool, args ...string) *runJob {
	t.Helper()
	return startRunPrep(t, criu, pipe, func(c *exec.Cmd) { c.Env = append(c.Env, env...) }, args...)
}

// startRunPrep is startRunWith with prep applied to the command before it
// starts (another environment, another user, a working directory).
func startRunPrep(t *testing.T, criu string, pipe bool, prep func(*exec.Cmd), args ...string) *runJob {
	t.Helper()
	dir := t.TempDir()
	r := &runJob{out: filepath.Join(dir, "job.out"), err: filepath.Join(dir, "cryo.err"), done: make(chan struct{})}
	outf, _ := os.Create(r.out)
	errf, _ := os.Create(r.err)
	r.cmd = exec.Command(bin("cryo"), append([]string{"run"}, args...)...)
	r.cmd.Stdout, r.cmd.Stderr = outf, errf
	if pipe {
		r.cmd.Stdout = &syncFile{f: outf} // not an *os.File: exec copies it through a pipe
	}
	r.cmd.Env = append(os.Environ(), "CRYO_CRIU="+criu)
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if prep != nil {
		prep(r.cmd)
	}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if !pipe {
		outf.Close()
	}
	errf.Close()
	go func() {
		err := r.cmd.Wait() // with pipe, after the copy is done
		outf.Close()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			r.code = ee.ExitCode()
		}
		close(r.done)
	}()
	t.Cleanup(func() {
		select {
		case <-r.done:
		default:
			syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
			<-r.done
		}
		// The job runs in sessions of its own: end whatever cryo left.
		for _, m := range jobInitRE.FindAllStringSubmatch(r.messages(t), -1) {
			if pid, err := strconv.Atoi(m[1]); err == nil {
				killTree(pid)
			}
		}
	})
	return r
}

var jobInitRE = regexp.MustCompile(`job-init pid (\d+)`)

// syncFile writes to f, hiding that it is a file.
type syncFile struct {
	mu sync.Mutex
	f  *os.File
}

func (s *syncFile) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.f.Write(b)
}

// killTree kills pid and its descendants, if pid is still a cryo job-init.
func killTree(pid int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(b), "job-init") {
		return
	}
	pids, _ := proc.Tree(pid)
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGKILL)
	}
}

func (r *runJob) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-r.done:
		return r.code
	case <-time.After(timeout):
		t.Fatalf("cryo run still running after %v\ncryo said:\n%s", timeout, r.messages(t))
		return 0
	}
}

func (r *runJob) messages(t *testing.T) string {
	b, _ := os.ReadFile(r.err)
	return string(b)
}

// waitFor waits until cryo's messages contain s.
func (r *runJob) waitFor(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(r.messages(t), s) {
		if time.Now().After(deadline) {
			t.Fatalf("cryo never said %q within %v; it said:\n%s", s, timeout, r.messages(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkOffloadResult asserts that the host finished with the reference
// result, that every item was answered, and that the job was never started
// over from the beginning.
func checkOffloadResult(t *testing.T, r *runJob, items int, want string) {
	t.Helper()
	p := readProgress(t, r.out)
	if "result "+p.result != want {
		t.Errorf("host result %q, want %q (output: %s; other: %q)\ncryo said:\n%s", p.result, want, compact(p.steps), p.other, r.messages(t))
	}
	seen := map[int]bool{}
	starts := 0
	for _, s := range p.steps {
		seen[s] = true
		if s == 1 {
			starts++
		}
	}
	for i := 1; i <= items; i++ {
		if !seen[i] {
			t.Errorf("item %d never answered (steps %s)", i, compact(p.steps))
			break
		}
	}
	if starts != 1 {
		t.Errorf("the job started from item 1 %d times: it was restarted, not restored (steps %s)", starts, compact(p.steps))
	}
}

func offloadArgs(store, sock string, items int, extra ...string) []string {
	return append([]string{"--store", store, "--", bin("offload"), "-role", "host", "-addr", sock,
		"-items", fmt.Sprint(items), "-delay", "25ms"}, extra...)
}

func TestRunRecoversFromOffloadFailures(t *testing.T) {
	criu := requireCRIU(t)
	buildOffload(t)
	// The fault strikes at item 100, a few checkpoints (one a second) in.
	const items = 160
	want := offloadReference(t, items)
	cases := []struct {
		name, fault string
		flags       []string // cryo run flags
		hostFlags   []string
		workerFlags []string
		kind        string // the failure cryo must report
	}{
		{name: "worker killed", fault: "kill", kind: "failure: tree-exit: offload tree offload-1 (pid"},
		{name: "worker exits", fault: "exit", hostFlags: []string{"-patient"}, kind: "failure: tree-exit: offload tree offload-1"},
		{name: "channel closed", fault: "close", hostFlags: []string{"-patient"}, flags: []string{"--channel-grace", "1s"}, kind: "failure: channel: unix channel between"},
		{name: "worker hangs", fault: "hang", workerFlags: []string{"-work", "5ms"}, flags: []string{"--hang-timeout", "3s"}, kind: "failure: hang: offload tree offload-1 made no CPU progress"},
		{name: "heartbeat stops", fault: "hang", flags: []string{"--heartbeat-timeout", "2s"}, kind: "failure: heartbeat: no heartbeat"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			store, sock, ff := filepath.Join(dir, "store"), filepath.Join(dir, "w.sock"), filepath.Join(dir, "fault-done")
			worker := strings.Join(append([]string{bin("offload"), "-role", "worker", "-addr", sock,
				"-fault", tc.fault, "-fault-at", "100", "-fault-file", ff}, tc.workerFlags...), " ")
			args := append([]string{"--interval", "1s", "--offload", worker}, tc.flags...)
			args = append(args, offloadArgs(store, sock, items, tc.hostFlags...)...)
			r := startRun(t, criu, args...)
			code := r.wait(t, 90*time.Second)
			msgs := r.messages(t)
			if code != 0 {
				t.Fatalf("cryo run exited %d, want 0\ncryo said:\n%s", code, msgs)
			}
			if _, err := os.Stat(ff); err != nil {
				t.Fatalf("the fault never struck (no %s): the test proves nothing\ncryo said:\n%s", ff, msgs)
			}
			if !strings.Contains(msgs, tc.kind) {
				t.Errorf("cryo did not report %q\ncryo said:\n%s", tc.kind, msgs)
			}
			if !strings.Contains(msgs, "restored: generation") {
				t.Errorf("cryo did not restore a checkpoint\ncryo said:\n%s", msgs)
			}
			checkOffloadResult(t, r, items, want)
		})
	}
}

func TestRunSignalsAndResume(t *testing.T) {
	criu := requireCRIU(t)
	buildOffload(t)
	const items = 100
	want := offloadReference(t, items)
	dir := t.TempDir()
	store, sock := filepath.Join(dir, "store"), filepath.Join(dir, "w.sock")
	worker := bin("offload") + " -role worker -addr " + sock
	args := append([]string{"--offload", worker}, offloadArgs(store, sock, items)...)

	r := startRun(t, criu, args...)
	waitStep(t, r.out, 10, 30*time.Second)
	r.cmd.Process.Signal(syscall.SIGUSR1)
	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	waitStep(t, r.out, 40, 30*time.Second)
	r.cmd.Process.Signal(syscall.SIGTERM)
	if code := r.wait(t, 30*time.Second); code != 143 {
		t.Fatalf("cryo run after SIGTERM exited %d, want 143\n%s", code, r.messages(t))
	}
	if !strings.Contains(r.messages(t), "stopped: checkpointed as generation 2") {
		t.Errorf("SIGTERM did not checkpoint and stop:\n%s", r.messages(t))
	}
	stoppedAt := readProgress(t, r.out).last()
	if stoppedAt >= items {
		t.Fatalf("the job finished before it could be stopped (at %d)", stoppedAt)
	}

	// The same command on the same store resumes the job.
	r2 := startRun(t, criu, args...)
	if code := r2.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("resumed cryo run exited %d\n%s", code, r2.messages(t))
	}
	if !strings.Contains(r2.messages(t), "restored: generation 2") {
		t.Errorf("second cryo run did not resume from generation 2:\n%s", r2.messages(t))
	}
	// The restored host keeps appending to the output file it had.
	p := readProgress(t, r.out)
	first := -1
	for i, st := range p.steps {
		if i > 0 && st <= p.steps[i-1] {
			first = i
			break
		}
	}
	if first >= 0 {
		t.Errorf("the resumed job went back from item %d to %d: it restarted", p.steps[first-1], p.steps[first])
	}
	checkRun(t, "first and resumed run together", p.steps, 1, items)
	if "result "+p.result != want {
		t.Errorf("resumed result %q, want %q", p.result, want)
	}

	// Once completed, the store does not resume again: a new run starts
	// from item 1.
	r3 := startRun(t, criu, args...)
	if code := r3.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("third cryo run exited %d\n%s", code, r3.messages(t))
	}
	if p := readProgress(t, r3.out); len(p.steps) == 0 || p.steps[0] != 1 {
		t.Errorf("a run after completion should start afresh, began at %s", compact(p.steps))
	}
}

func TestRunGivesUpAfterMaxRestarts(t *testing.T) {
	criu := requireCRIU(t)
	buildOffload(t)
	dir := t.TempDir()
	store, sock := filepath.Join(dir, "store"), filepath.Join(dir, "w.sock")
	// No fault file: the worker dies at item 20 every time.
	worker := bin("offload") + " -role worker -addr " + sock + " -fault kill -fault-at 20"
	args := append([]string{"--interval", "200ms", "--max-restarts", "2", "--offload", worker}, offloadArgs(store, sock, 60)...)
	r := startRun(t, criu, args...)
	code := r.wait(t, 90*time.Second)
	msgs := r.messages(t)
	if code == 0 {
		t.Fatalf("a job that always fails ended with exit 0\n%s", msgs)
	}
	if !strings.Contains(msgs, "gave up restoring the job after 2 restarts") {
		t.Errorf("no clear give-up message:\n%s", msgs)
	}
	if n := strings.Count(msgs, "restored:"); n != 2 {
		t.Errorf("%d restores, want exactly --max-restarts=2\n%s", n, msgs)
	}
}

func TestRunControlSocketAndMetrics(t *testing.T) {
	criu := requireCRIU(t)
	buildOffload(t)
	dir := t.TempDir()
	store, sock := filepath.Join(dir, "store"), filepath.Join(dir, "w.sock")
	port := freePort(t)
	worker := bin("offload") + " -role worker -addr " + sock
	args := append([]string{"--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port), "--offload", worker}, offloadArgs(store, sock, 200)...)
	r := startRun(t, criu, args...)
	waitStep(t, r.out, 5, 30*time.Second)

	st := cryo(t, criu, "ctl", "--store", store, "checkpoint")
	if st.code != 0 || !strings.Contains(st.stdout, "checkpoint: generation 1") {
		t.Fatalf("ctl checkpoint: %s", st)
	}
	st = cryo(t, criu, "ctl", "--store", store, "--json", "status")
	if st.code != 0 || !strings.Contains(st.stdout, `"state": "running"`) || !strings.Contains(st.stdout, `"offload-1"`) {
		t.Fatalf("ctl status: %s", st)
	}
	// swap-out through the supervisor: the job stops, and stays supervised.
	st = cryo(t, criu, "swap-out", "--store", store)
	if st.code != 0 {
		t.Fatalf("swap-out: %s", st)
	}
	at := readProgress(t, r.out).last()
	time.Sleep(500 * time.Millisecond)
	if now := readProgress(t, r.out).last(); now != at {
		t.Fatalf("swapped-out job still runs: step %d -> %d", at, now)
	}
	st = cryo(t, criu, "ctl", "--store", store, "status")
	if !strings.Contains(st.stdout, "swapped-out") {
		t.Errorf("status after swap-out: %s", st)
	}
	if st = cryo(t, criu, "swap-in", "--store", store); st.code != 0 {
		t.Fatalf("swap-in: %s", st)
	}
	waitStep(t, r.out, at+5, 30*time.Second)

	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{`cryo_checkpoints_total{job="job"} 2`, `cryo_restores_total{job="job"} 1`, "cryo_checkpoint_duration_seconds_sum"} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %q:\n%s", m, body)
		}
	}
	// Stop through the socket: checkpoint, then the job ends with 143.
	if st = cryo(t, criu, "ctl", "--store", store, "stop"); st.code != 0 {
		t.Fatalf("ctl stop: %s", st)
	}
	if code := r.wait(t, 30*time.Second); code != 143 {
		t.Errorf("cryo run after ctl stop exited %d, want 143", code)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
