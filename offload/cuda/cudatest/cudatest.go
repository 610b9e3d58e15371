// Package cudatest builds the fake CUDA world that tests run against on
// machines without a GPU: the fake libcuda.so.1 and libnvidia-ml.so.1 of
// offload/cuda/testdata/fakecuda, the cudawork workload, and a fake-GPU
// root directory ($FAKECUDA_ROOT) with GPUs, a driver version and injected
// failures. See fakecuda.c for the fake's contract.
//
// It is for tests only (it takes a testing.TB) and needs gcc.
package cudatest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// GPU is one fake GPU.
type GPU struct {
	UUID  string
	MiB   int
	Model string
}

// Models of the default fake GPUs.
const (
	ModelA = "Fake A100-SXM4-40GB"
	ModelB = "Fake H100-SXM5-80GB"
)

// UUID returns the UUID of default fake GPU i.
func UUID(i int) string { return fmt.Sprintf("GPU-%08x-0000-4000-8000-00000000cafe", 0xa0+i) }

// DefaultGPUs are the GPUs a new fake has: 0 and 1 are the same model,
// 2 another.
func DefaultGPUs() []GPU {
	return []GPU{{UUID(0), 64, ModelA}, {UUID(1), 64, ModelA}, {UUID(2), 64, ModelB}}
}

// Fake is a built fake driver and its GPU root.
type Fake struct {
	Dir      string // where the built files are
	LibCUDA  string // the fake libcuda.so.1
	LibNVML  string // the fake libnvidia-ml.so.1
	Workload string // the cudawork binary
	Root     string // $FAKECUDA_ROOT
}

// Source is the directory of the fake's C sources.
func Source() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "fakecuda")
}

// Build compiles the fake into a temporary directory and sets up a root
// with DefaultGPUs and driver 580.65.06 (CUDA 13.0). A missing gcc skips
// the test, or fails it under CRYO_NO_SKIP=1.
func Build(t testing.TB) *Fake {
	t.Helper()
	needGCC(t)
	dir := t.TempDir()
	if err := Compile(dir); err != nil {
		t.Fatal(err)
	}
	return New(t, dir)
}

func needGCC(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatalf("gcc is needed to build the fake CUDA driver: %v", err)
		}
		t.Skipf("gcc is needed to build the fake CUDA driver: %v", err)
	}
}

// Names of the built files.
const (
	libCUDAName  = "libcuda.so.1"
	libNVMLName  = "libnvidia-ml.so.1"
	workloadName = "cudawork"
)

// Compile builds the fake libcuda.so.1, libnvidia-ml.so.1 and cudawork
// into dir, for New (tests that share one build call it once).
func Compile(dir string) error {
	src := Source()
	cflags := []string{"-O2", "-Wall", "-Wextra", "-Werror", "-Wno-format-truncation"}
	builds := [][]string{
		append(append([]string{}, cflags...), "-shared", "-fPIC", "-pthread", "-o", filepath.Join(dir, libCUDAName), filepath.Join(src, "fakecuda.c")),
		append(append([]string{}, cflags...), "-shared", "-fPIC", "-o", filepath.Join(dir, libNVMLName), filepath.Join(src, "fakenvml.c")),
		append(append([]string{}, cflags...), "-o", filepath.Join(dir, workloadName), filepath.Join(src, "cudawork.c"), "-ldl"),
	}
	for _, args := range builds {
		if out, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("gcc %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// New sets up a fake from files Compile built: its own copies of them (a
// process that loads two fakes must get two libraries, each with its own
// state) and a root with DefaultGPUs and driver 580.65.06 (CUDA 13.0), all
// in a temporary directory of the test.
func New(t testing.TB, compiled string) *Fake {
	t.Helper()
	needGCC(t)
	dir := t.TempDir()
	// The fake's files must outlive processes that CRIU restores from them,
	// and be reachable to root's CRIU: keep everything under dir.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := &Fake{
		Dir:      dir,
		LibCUDA:  filepath.Join(dir, libCUDAName),
		LibNVML:  filepath.Join(dir, libNVMLName),
		Workload: filepath.Join(dir, workloadName),
		Root:     filepath.Join(dir, "root"),
	}
	for _, name := range []string{libCUDAName, libNVMLName, workloadName} {
		b, err := os.ReadFile(filepath.Join(compiled, name))
		if err != nil {
			t.Fatalf("the fake is not built in %s: %v", compiled, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(f.Root, 0o755); err != nil {
		t.Fatal(err)
	}
	f.SetGPUs(t, DefaultGPUs()...)
	return f
}

// SetGPUs replaces the fake's GPUs (index = order).
func (f *Fake) SetGPUs(t testing.TB, gpus ...GPU) {
	t.Helper()
	var b strings.Builder
	for _, g := range gpus {
		fmt.Fprintf(&b, "%s %d %s\n", g.UUID, g.MiB, g.Model)
	}
	f.write(t, "gpus", b.String())
}

// SetDriver sets the driver API version (cuDriverGetVersion, e.g. 12080)
// and the display driver version NVML reports.
func (f *Fake) SetDriver(t testing.TB, cudaVersion int, driverVersion string) {
	t.Helper()
	f.write(t, "driver", fmt.Sprintf("%d %s\n", cudaVersion, driverVersion))
}

// Inject sets the injected failures and delays ("key=value" items, see
// fakecuda.c); none clears them.
func (f *Fake) Inject(t testing.TB, items ...string) {
	t.Helper()
	if len(items) == 0 {
		if err := os.Remove(filepath.Join(f.Root, "inject")); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		return
	}
	f.write(t, "inject", strings.Join(items, "\n")+"\n")
}

// Xid appends an Xid event for a GPU, for the fake NVML to deliver.
func (f *Fake) Xid(t testing.TB, uuid string, xid int) {
	t.Helper()
	fh, err := os.OpenFile(filepath.Join(f.Root, "xid"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	fmt.Fprintf(fh, "%s %d\n", uuid, xid)
}

func (f *Fake) write(t testing.TB, name, text string) {
	t.Helper()
	tmp := filepath.Join(f.Root, name+".tmp")
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(f.Root, name)); err != nil {
		t.Fatal(err)
	}
}

// Env is the environment a workload needs to use the fake.
func (f *Fake) Env() []string {
	return []string{"FAKECUDA_ROOT=" + f.Root, "CUDAWORK_LIBCUDA=" + f.LibCUDA}
}

// DeviceBytes is the device memory a live process (pid as the test sees
// it) holds on a GPU, and whether it holds any context there at all.
func (f *Fake) DeviceBytes(uuid string, pid int) (int64, bool) {
	ents, err := os.ReadDir(filepath.Join(f.Root, "mem", uuid))
	if err != nil {
		return 0, false
	}
	start := StartTime(pid)
	name, err := Name(pid)
	if err != nil {
		return 0, false
	}
	var n int64
	found := false
	for _, e := range ents {
		parts := strings.SplitN(e.Name(), ".", 3)
		if len(parts) != 3 || parts[0] != name || start == 0 {
			continue
		}
		// The fake names memory by its owner's start time on the root
		// clock, give or take the tick a time namespace can cost.
		if s, err := strconv.ParseUint(parts[1], 10, 64); err != nil || s+1 < start || s > start+1 {
			continue
		}
		if info, err := e.Info(); err == nil {
			n += info.Size()
			found = true
		}
	}
	return n, found
}

// Name is the fake's name of a process (pid as the test sees it): the
// inode of its PID namespace and its PID there, "<ns>-<pid>" (see
// fakegpu.h). Memory files and mailboxes go by it.
func Name(pid int) (string, error) {
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
	if err != nil {
		return "", err
	}
	ns, pre := strings.CutPrefix(link, "pid:[")
	ns, post := strings.CutSuffix(ns, "]")
	if !pre || !post {
		return "", fmt.Errorf("pid %d: PID namespace %q", pid, link)
	}
	inner, err := InnerPID(pid)
	if err != nil {
		return "", err
	}
	return ns + "-" + strconv.Itoa(inner), nil
}

// InnerPID is a process's PID in its own PID namespace (pid as the test
// sees it): the last field of NSpid in its status.
func InnerPID(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			return strconv.Atoi(f[len(f)-1])
		}
	}
	return 0, fmt.Errorf("pid %d: no NSpid in its status", pid)
}

// StartTime is a process's start time from /proc (0: no such process).
func StartTime(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

// Run is a cudawork process whose output goes to a file (so that CRIU can
// checkpoint and restore it: no pipe to the test), opened for appending
// (CRIU restores such a file whatever its size): a run restored after the
// original went on adds its lines after the original's.
type Run struct {
	PID  int
	Out  string // its stdout and stderr
	cmd  *exec.Cmd
	wait chan error
}

// Start starts cudawork with args in a session of its own, output to a
// file in dir, and waits until its CUDA context is ready.
func (f *Fake) Start(t testing.TB, dir string, args ...string) *Run {
	t.Helper()
	return f.StartWith(t, dir, &syscall.SysProcAttr{Setsid: true}, args...)
}

// StartWith is Start with the process attributes given (a PID namespace of
// its own, say); a start that attr makes fail fails the test.
func (f *Fake) StartWith(t testing.TB, dir string, attr *syscall.SysProcAttr, args ...string) *Run {
	t.Helper()
	out := filepath.Join(dir, fmt.Sprintf("cudawork-%d.out", time.Now().UnixNano()))
	fh, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	cmd := exec.Command(f.Workload, args...)
	cmd.Env = append(os.Environ(), f.Env()...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, fh, fh
	cmd.SysProcAttr = attr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &Run{PID: cmd.Process.Pid, Out: out, cmd: cmd, wait: make(chan error, 1)}
	go func() { r.wait <- cmd.Wait() }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cudawork (pid %d) printed:\n%s", r.PID, r.Output())
		}
		r.Kill()
	})
	if _, err := r.WaitFor("ready ", 10*time.Second); err != nil {
		t.Fatalf("cudawork did not start: %v\n%s", err, r.Output())
	}
	return r
}

// Kill kills the process (whether it is still our child or was restored
// by CRIU under the same PID) and waits for it to be gone. A PID that no
// longer runs the workload binary is left alone.
func (r *Run) Kill() {
	if r.PID <= 0 {
		return
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", r.PID)); err != nil || exe != r.cmd.Path {
		return
	}
	_ = syscall.Kill(r.PID, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for StartTime(r.PID) != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// Exited reports, without blocking, whether our child has exited (a process
// restored by CRIU is not our child: use Gone).
func (r *Run) Exited() bool {
	select {
	case err := <-r.wait:
		r.wait <- err
		return true
	default:
		return false
	}
}

// Output is everything the process printed so far.
func (r *Run) Output() string {
	b, _ := os.ReadFile(r.Out)
	return string(b)
}

// Steps is the last "step N" it printed (0 for none).
func (r *Run) Steps() int {
	last := 0
	sc := bufio.NewScanner(strings.NewReader(r.Output()))
	for sc.Scan() {
		if n, ok := strings.CutPrefix(sc.Text(), "step "); ok {
			if v, err := strconv.Atoi(n); err == nil {
				last = v
			}
		}
	}
	return last
}

// WaitFor waits until a line starting with prefix appears and returns it.
// It fails early when the output shows a CUDA error.
func (r *Run) WaitFor(prefix string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		sc := bufio.NewScanner(strings.NewReader(r.Output()))
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, prefix) {
				return line, nil
			}
			if strings.HasPrefix(line, "cuda error:") || strings.HasPrefix(line, "cudawork:") {
				return "", fmt.Errorf("workload failed: %s", line)
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no %q line after %s", prefix, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Results are the values of every "result" line so far.
func (r *Run) Results() []string {
	var out []string
	for _, line := range strings.Split(r.Output(), "\n") {
		if v, ok := strings.CutPrefix(line, "result "); ok {
			out = append(out, v)
		}
	}
	return out
}

// Result waits for the first "result" line and returns its value.
func (r *Run) Result(timeout time.Duration) (string, error) {
	line, err := r.WaitFor("result ", timeout)
	return strings.TrimPrefix(line, "result "), err
}

// Reference runs cudawork to the end without interruption and returns its
// result, for comparison.
func (f *Fake) Reference(t testing.TB, args ...string) string {
	t.Helper()
	cmd := exec.Command(f.Workload, append(args, "-delay", "0")...)
	cmd.Env = append(os.Environ(), f.Env()...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("reference run: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "result "); ok {
			return v
		}
	}
	t.Fatalf("reference run printed no result:\n%s", out)
	return ""
}
