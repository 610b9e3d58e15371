// Package e2e drives the built cryo binary as a user would, against real
// CRIU and the workloads under e2e/workloads.
//
// The tests need root and CRIU. Without them they skip and say why, except
// under CRYO_NO_SKIP=1 (set by scripts/run-tests.sh when `make test` runs as
// root with CRIU installed), where a test that cannot run fails. CRIU is
// taken from CRYO_CRIU, else from the repository's .deps/criu/sbin/criu.
// `go test -short` skips them all. They run one at a time: a restore needs
// the very PIDs its job had.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

// workloads are the programs under e2e/workloads that the tests run.
var workloads = []string{"memstate", "tree", "files", "tcp", "mixed", "dirty", "shm"}

var (
	binDir    string // where TestMain builds cryo and the workloads
	buildOnce sync.Once
	buildErr  error
)

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "cryo-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The user-mode tier runs these binaries as the test user.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// repoRoot is the module root (tests run in e2e/).
func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Dir(wd)
}

// build compiles cryo and the workloads into binDir, once per test binary.
func build(t *testing.T) {
	t.Helper()
	buildOnce.Do(func() {
		pkgs := []string{"./cmd/cryo"}
		for _, w := range workloads {
			pkgs = append(pkgs, "./e2e/workloads/"+w)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-buildvcs=false", "-o", binDir + "/"}, pkgs...)...)
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build %s: %v\n%s", strings.Join(pkgs, " "), err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

func bin(name string) string { return filepath.Join(binDir, name) }

// skipOrFail skips the test with reason, or fails it under CRYO_NO_SKIP=1,
// where nothing may skip.
func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("CRYO_NO_SKIP") == "1" {
		t.Fatalf("cannot run, and CRYO_NO_SKIP=1 forbids skipping: %s", reason)
	}
	t.Skip(reason)
}

// slow skips a test under -short.
func slow(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test; -short skips it")
	}
}

// requireCRIU returns the CRIU binary the tests use, after checking that
// the test can run (root, CRIU present) and building the binaries.
func requireCRIU(t *testing.T) string {
	t.Helper()
	slow(t)
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root: CRIU checkpoints and restores processes only as root")
	}
	criu, err := findCRIU()
	if err != nil {
		skipOrFail(t, err.Error())
	}
	build(t)
	return criu
}

// requireBinaries builds cryo and the workloads, for tests that need no root.
func requireBinaries(t *testing.T) {
	t.Helper()
	slow(t)
	build(t)
}

func findCRIU() (string, error) {
	p, src := os.Getenv("CRYO_CRIU"), "CRYO_CRIU"
	if p == "" {
		p, src = "/usr/local/lib/cryo/criu/sbin/criu", "`make criu`'s default place"
	}
	st, err := os.Stat(p)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("CRIU not found: %s (from %s) is not an executable file; run `make criu` or set CRYO_CRIU", p, src)
	}
	return p, nil
}

// cryoResult is what one cryo command did.
type cryoResult struct {
	code           int
	stdout, stderr string
}

func (r cryoResult) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// cryo runs the built cryo binary with the given CRIU and a clean CRYO_*
// environment.
func cryo(t *testing.T, criu string, args ...string) cryoResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := cryoCommand(ctx, criu, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	return runCryo(t, cmd, &out, &errb, args)
}

// cryoCommand is cryo with args, in this environment but for any CRYO_
// setting (so that a developer's own settings do not leak into a test),
// with CRYO_CRIU set to criu unless it is empty.
func cryoCommand(ctx context.Context, criu string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, bin("cryo"), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CRYO_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if criu != "" {
		cmd.Env = append(cmd.Env, "CRYO_CRIU="+criu)
	}
	return cmd
}

// runCryo runs a prepared cryo command to its end and collects what it did;
// anything but an exit status fails the test.
func runCryo(t *testing.T, cmd *exec.Cmd, out, errb *bytes.Buffer, args []string) cryoResult {
	t.Helper()
	start := time.Now()
	err := cmd.Run()
	r := cryoResult{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		r.code = ee.ExitCode()
	default:
		t.Fatalf("cryo %s: %v (after %v)\nstderr: %s", strings.Join(args, " "), err, time.Since(start), r.stderr)
	}
	t.Logf("cryo %s: exit %d in %v", strings.Join(args, " "), r.code, time.Since(start).Round(time.Millisecond))
	return r
}

// job is a workload started by a test, in a session of its own (as a batch
// system would start it), with stdout and stderr going to a file.
type job struct {
	pid  int
	out  string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process is reaped
}

// startJob runs workload name with args. Its output goes to out, appended to
// when appendOut is set, else truncated first (as the shell's > does). The
// test reaps it as soon as it dies, so a killed job leaves no zombie to
// hold its PID, and kills it at the end of the test if it is still there.
func startJob(t *testing.T, name, out string, appendOut bool, args ...string) *job {
	t.Helper()
	return startJobWith(t, name, out, appendOut, nil, args...)
}

// startJobWith is startJob with prep applied to the command before it
// starts (to run it as another user, say).
func startJobWith(t *testing.T, name, out string, appendOut bool, prep func(*exec.Cmd), args ...string) *job {
	t.Helper()
	flags := os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	if appendOut {
		flags = os.O_WRONLY | os.O_CREATE | os.O_APPEND
	}
	f, err := os.OpenFile(out, flags, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(bin(name), args...)
	cmd.Stdout, cmd.Stderr = f, f // files, not pipes: CRIU cannot dump a pipe to us
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if prep != nil {
		prep(cmd)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	j := &job{pid: cmd.Process.Pid, out: out, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(j.done)
	}()
	t.Cleanup(func() {
		if !j.exited() {
			_ = syscall.Kill(-j.pid, syscall.SIGKILL)
			<-j.done
		}
	})
	return j
}

func (j *job) exited() bool {
	select {
	case <-j.done:
		return true
	default:
		return false
	}
}

// waitExit waits until the job's process has ended and been reaped.
func (j *job) waitExit(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-j.done:
	case <-time.After(timeout):
		t.Fatalf("job %d still running after %v", j.pid, timeout)
	}
}

// killTree kills the job's whole process group and waits for its root.
func (j *job) killTree(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(-j.pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill job %d: %v", j.pid, err)
	}
	j.waitExit(t, 10*time.Second)
}

// progress is what a workload printed: its steps in order, and its result.
type progress struct {
	steps  []int
	result string
	other  []string // anything else, such as error messages
}

func (p progress) last() int {
	if len(p.steps) == 0 {
		return 0
	}
	return p.steps[len(p.steps)-1]
}

// readProgress parses a workload's output file; a last line without its
// newline (still being written) is left out.
func readProgress(t *testing.T, path string) progress {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	var p progress
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if s, ok := strings.CutPrefix(line, "step "); ok {
			if n, err := strconv.Atoi(s); err == nil {
				p.steps = append(p.steps, n)
				continue
			}
		}
		if r, ok := strings.CutPrefix(line, "result "); ok && p.result == "" {
			p.result = r
			continue
		}
		p.other = append(p.other, line)
	}
	return p
}

// waitStep waits until the job's output shows step n or later.
func waitStep(t *testing.T, out string, n int, timeout time.Duration) progress {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		p := readProgress(t, out)
		if p.last() >= n {
			return p
		}
		if len(p.other) > 0 || p.result != "" {
			t.Fatalf("waiting for step %d of %s: workload printed %q, result %q", n, out, p.other, p.result)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no step %d in %s after %v (last: step %d)", n, out, timeout, p.last())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkRun asserts that steps from..to each appear once and in order.
func checkRun(t *testing.T, what string, steps []int, from, to int) {
	t.Helper()
	want := make([]int, 0, to-from+1)
	for s := from; s <= to; s++ {
		want = append(want, s)
	}
	if !slices.Equal(steps, want) {
		t.Errorf("%s: steps %s, want each of %d..%d once, in order", what, compact(steps), from, to)
	}
}

// compact renders a step list as ranges ("1-12 7-40").
func compact(steps []int) string {
	var parts []string
	for i := 0; i < len(steps); {
		j := i
		for j+1 < len(steps) && steps[j+1] == steps[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.Itoa(steps[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", steps[i], steps[j]))
		}
		i = j + 1
	}
	return "[" + strings.Join(parts, " ") + "]"
}

var (
	refMu sync.Mutex
	refs  = map[string]string{}
)

// reference runs a workload straight through, without pauses, and returns
// its result; results are remembered per command line.
func reference(t *testing.T, name string, args ...string) string {
	t.Helper()
	key := name + " " + strings.Join(args, " ")
	refMu.Lock()
	defer refMu.Unlock()
	if r, ok := refs[key]; ok {
		return r
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "reference.out")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin(name), append(args, "-delay", "0")...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(out)
		t.Fatalf("reference run of %s: %v\n%s", key, err, b)
	}
	p := readProgress(t, out)
	if p.result == "" || len(p.other) > 0 {
		t.Fatalf("reference run of %s printed no result: %+v", key, p)
	}
	refs[key] = p.result
	return p.result
}

// procState is the state letter of pid ('R', 'S', 'Z', ...), or 0 when no
// process holds it.
func procState(pid int) byte {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// alive reports whether pid is held by a process that has not ended.
func alive(pid int) bool {
	s := procState(pid)
	return s != 0 && s != 'Z' && s != 'X'
}

// waitEnded waits until none of pids is alive. A restored job is not the
// test's child: init reaps it, so a zombie counts as ended.
func waitEnded(t *testing.T, timeout time.Duration, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("pid %d still running after %v", pid, timeout)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// ours reports whether pid runs one of the binaries this test built, so
// that cleanup never kills someone else's process that reused a PID.
func ours(pid int) bool {
	exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
	return err == nil && strings.HasPrefix(exe, binDir+"/")
}

// killAtEnd kills, when the test ends, whichever of pids still runs one of
// our binaries (a restored job is not our child, so startJob's cleanup
// does not cover it).
func killAtEnd(t *testing.T, pids ...int) {
	t.Cleanup(func() {
		for _, pid := range pids {
			if alive(pid) && ours(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

// manifest reads a committed generation of a store.
func manifest(t *testing.T, dir string, gen int) *store.Manifest {
	t.Helper()
	s, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.ReadManifest(gen)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func pidsOf(m *store.Manifest) []int {
	var pids []int
	for _, p := range m.Job.Processes {
		pids = append(pids, p.PID)
	}
	return pids
}

// freePID returns a PID that no process holds right now.
func freePID(t *testing.T) int {
	t.Helper()
	for pid := 30000; pid > 1000; pid -= 97 {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
			return pid
		}
	}
	t.Fatal("no free pid found")
	return 0
}
