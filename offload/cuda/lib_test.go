package cuda

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda/cudatest"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

// These tests drive the real Lib (dlopen, cgo, argument structs) against
// the fake driver of testdata/fakecuda and a live cudawork process. They
// need gcc but neither root nor CRIU.

var work = []string{"-steps", "40", "-kib", "256", "-delay", "10"}

func openFake(t *testing.T, f *cudatest.Fake) *Lib {
	t.Helper()
	t.Setenv("FAKECUDA_ROOT", f.Root)
	l, err := Open(f.LibCUDA)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func wantState(t *testing.T, l *Lib, pid int, want offload.State) {
	t.Helper()
	st, err := l.State(pid)
	if err != nil || st != want {
		t.Fatalf("state of pid %d = %v, %v; want %v", pid, st, err, want)
	}
}

func TestLibCheckpointRoundTrip(t *testing.T) {
	f := buildFake(t)
	want := f.Reference(t, work...)
	l := openFake(t, f)
	if l.Version() != 13000 || l.Layout() != LayoutGPUPairs || l.APIError() != nil {
		t.Fatalf("version %d layout %v api %v", l.Version(), l.Layout(), l.APIError())
	}
	r := f.Start(t, t.TempDir(), work...)
	wantState(t, l, r.PID, offload.Running)
	if tid, err := l.RestoreThreadID(r.PID); err != nil || tid == r.PID || tid <= 0 {
		t.Errorf("restore thread of %d = %d, %v; want a thread of its own", r.PID, tid, err)
	}

	if err := l.Lock(r.PID, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	wantState(t, l, r.PID, offload.Locked)
	time.Sleep(50 * time.Millisecond)
	s1 := r.Steps()
	time.Sleep(250 * time.Millisecond)
	if s2 := r.Steps(); s2 != s1 {
		t.Errorf("locked workload went on from step %d to %d", s1, s2)
	}

	if err := l.Checkpoint(r.PID); err != nil {
		t.Fatal(err)
	}
	wantState(t, l, r.PID, offload.Checkpointed)
	if _, held := f.DeviceBytes(cudatest.UUID(0), r.PID); held {
		t.Error("checkpointed process still holds device memory")
	}

	if err := l.Restore(r.PID, nil); err != nil {
		t.Fatal(err)
	}
	wantState(t, l, r.PID, offload.Locked)
	if n, _ := f.DeviceBytes(cudatest.UUID(0), r.PID); n != 256<<10 {
		t.Errorf("restored device memory on GPU 0 = %d bytes, want %d", n, 256<<10)
	}
	if err := l.Unlock(r.PID); err != nil {
		t.Fatal(err)
	}
	wantState(t, l, r.PID, offload.Running)
	got, err := r.Result(30 * time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, r.Output())
	}
	if got != want {
		t.Errorf("result after checkpoint/restore %s, uninterrupted %s", got, want)
	}
}

func TestLibRefusesIllegalTransitions(t *testing.T) {
	f := buildFake(t)
	l := openFake(t, f)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "5")
	illegal := func(what string, err error) {
		t.Helper()
		var ce *Error
		if !errors.As(err, &ce) || ce.Code != ErrIllegalState || ce.Name != "CUDA_ERROR_ILLEGAL_STATE" || ce.PID != r.PID {
			t.Errorf("%s: %v, want CUDA_ERROR_ILLEGAL_STATE naming pid %d", what, err, r.PID)
		}
	}
	// From RUNNING only lock is legal.
	illegal("checkpoint while running", l.Checkpoint(r.PID))
	illegal("restore while running", l.Restore(r.PID, nil))
	illegal("unlock while running", l.Unlock(r.PID))
	wantState(t, l, r.PID, offload.Running)
	// From LOCKED: checkpoint or unlock.
	if err := l.Lock(r.PID, time.Second); err != nil {
		t.Fatal(err)
	}
	illegal("lock while locked", l.Lock(r.PID, time.Second))
	illegal("restore while locked", l.Restore(r.PID, nil))
	// From CHECKPOINTED only restore.
	if err := l.Checkpoint(r.PID); err != nil {
		t.Fatal(err)
	}
	illegal("unlock while checkpointed", l.Unlock(r.PID))
	illegal("lock while checkpointed", l.Lock(r.PID, time.Second))
	illegal("checkpoint while checkpointed", l.Checkpoint(r.PID))
	wantState(t, l, r.PID, offload.Checkpointed)
	if err := l.Restore(r.PID, nil); err != nil {
		t.Fatal(err)
	}
	if err := l.Unlock(r.PID); err != nil {
		t.Fatal(err)
	}
	if _, err := r.WaitFor("step 3", 5*time.Second); err != nil {
		t.Errorf("%v\n%s", err, r.Output())
	}
}

func TestLibRejectsNonzeroReservedFields(t *testing.T) {
	f := buildFake(t)
	l := openFake(t, f)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "5")
	for _, c := range []struct{ phase, fn string }{
		{"lock", "cuCheckpointProcessLock"},
		{"checkpoint", "cuCheckpointProcessCheckpoint"},
		{"restore", "cuCheckpointProcessRestore"},
		{"unlock", "cuCheckpointProcessUnlock"},
	} {
		args := [ArgsSize]byte{}
		args[40] = 1
		if err := l.withArgs(c.phase, c.fn, r.PID, args); !IsCode(err, ErrInvalidValue) {
			t.Errorf("%s with a reserved byte set: %v, want CUDA_ERROR_INVALID_VALUE", c.fn, err)
		}
	}
	wantState(t, l, r.PID, offload.Running)
}

func TestLibLockTimeoutLeavesProcessRunning(t *testing.T) {
	f := buildFake(t)
	l := openFake(t, f)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "0")
	f.Inject(t, "kernel_ms=600") // each kernel keeps the fake GPU busy
	time.Sleep(100 * time.Millisecond)
	t0 := time.Now()
	err := l.Lock(r.PID, 100*time.Millisecond)
	if !errors.Is(err, offload.ErrLockTimeout) || !strings.Contains(err.Error(), "CUDA_ERROR_TIMEOUT") {
		t.Fatalf("lock with kernels in flight: %v, want a CUDA_ERROR_TIMEOUT matching ErrLockTimeout", err)
	}
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("lock took %s despite its 100ms timeout", d)
	}
	wantState(t, l, r.PID, offload.Running)
	// Work in flight that drains within the timeout does not fail the lock.
	f.Inject(t, "busy_ms=300")
	mustOK(t, l.Lock(r.PID, 5*time.Second))
	mustOK(t, l.Unlock(r.PID))
	f.Inject(t, "busy_ms=3000")
	if err := l.Lock(r.PID, 200*time.Millisecond); !errors.Is(err, offload.ErrLockTimeout) {
		t.Errorf("lock with 3 s of work in flight and a 200 ms timeout: %v", err)
	}
	wantState(t, l, r.PID, offload.Running)
	f.Inject(t)
	s := r.Steps()
	if _, err := r.WaitFor("step "+itoa(s+2), 10*time.Second); err != nil {
		t.Errorf("workload did not go on after the failed lock: %v", err)
	}
}

func TestLibRestoreOntoAnotherGPU(t *testing.T) {
	f := buildFake(t)
	want := f.Reference(t, work...)
	l := openFake(t, f)
	r := f.Start(t, t.TempDir(), work...)
	mustOK(t, l.Lock(r.PID, 5*time.Second))
	mustOK(t, l.Checkpoint(r.PID))
	old, _ := ParseUUID(cudatest.UUID(0))
	other, _ := ParseUUID(cudatest.UUID(1))
	h100, _ := ParseUUID(cudatest.UUID(2))
	// Another model is refused, and the process stays checkpointed.
	if err := l.Restore(r.PID, []Pair{{Old: old, New: h100}}); !IsCode(err, ErrInvalidDevice) {
		t.Errorf("restore onto another model: %v, want CUDA_ERROR_INVALID_DEVICE", err)
	}
	wantState(t, l, r.PID, offload.Checkpointed)
	mustOK(t, l.Restore(r.PID, []Pair{{Old: old, New: other}}))
	if n, _ := f.DeviceBytes(cudatest.UUID(1), r.PID); n != 256<<10 {
		t.Errorf("device memory on GPU 1 = %d, want %d", n, 256<<10)
	}
	if _, held := f.DeviceBytes(cudatest.UUID(0), r.PID); held {
		t.Error("process still holds memory on GPU 0")
	}
	mustOK(t, l.Unlock(r.PID))
	got, err := r.Result(30 * time.Second)
	if err != nil || got != want {
		t.Errorf("result on GPU 1 = %s, %v; want %s", got, err, want)
	}
}

func TestLibRemapNeedsCUDA13(t *testing.T) {
	f := buildFake(t)
	f.SetDriver(t, 12080, "570.86.10")
	l := openFake(t, f)
	if l.Layout() != LayoutReserved || l.APIError() != nil || !errors.Is(l.RemapError(), offload.ErrRemapUnsupported) {
		t.Fatalf("12.8 driver: layout %v, api %v, remap %v", l.Layout(), l.APIError(), l.RemapError())
	}
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "5")
	mustOK(t, l.Lock(r.PID, 5*time.Second))
	mustOK(t, l.Checkpoint(r.PID))
	old, _ := ParseUUID(cudatest.UUID(0))
	other, _ := ParseUUID(cudatest.UUID(1))
	err := l.Restore(r.PID, []Pair{{Old: old, New: other}})
	if !errors.Is(err, offload.ErrRemapUnsupported) || !strings.Contains(err.Error(), "13.0") {
		t.Errorf("remap on CUDA 12.8: %v, want ErrRemapUnsupported naming CUDA 13.0", err)
	}
	wantState(t, l, r.PID, offload.Checkpointed)
	mustOK(t, l.Restore(r.PID, nil)) // the 12.8 layout: 64 zero bytes
	mustOK(t, l.Unlock(r.PID))
}

func TestLibOldDriverHasNoCheckpointAPI(t *testing.T) {
	f := buildFake(t)
	f.SetDriver(t, 12040, "550.54.15")
	l := openFake(t, f)
	if err := l.APIError(); !errors.Is(err, ErrNoCheckpointAPI) || !strings.Contains(err.Error(), "12.8") {
		t.Errorf("12.4 driver: %v, want ErrNoCheckpointAPI naming 12.8", err)
	}
	if _, err := l.State(os.Getpid()); !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("State on a 12.4 driver: %v", err)
	}
}

func TestLibRestoreOutOfMemory(t *testing.T) {
	f := buildFake(t)
	f.SetGPUs(t, cudatest.GPU{UUID: cudatest.UUID(0), MiB: 4, Model: cudatest.ModelA}, cudatest.GPU{UUID: cudatest.UUID(1), MiB: 4, Model: cudatest.ModelA})
	l := openFake(t, f)
	a := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "3072", "-delay", "5")
	b := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "3072", "-delay", "5", "-device", "1")
	mustOK(t, l.Lock(a.PID, 5*time.Second))
	mustOK(t, l.Checkpoint(a.PID))
	old, _ := ParseUUID(cudatest.UUID(0))
	full, _ := ParseUUID(cudatest.UUID(1))
	if err := l.Restore(a.PID, []Pair{{Old: old, New: full}}); !IsCode(err, ErrOutOfMemory) {
		t.Errorf("restore onto a full GPU: %v, want CUDA_ERROR_OUT_OF_MEMORY", err)
	}
	wantState(t, l, a.PID, offload.Checkpointed)
	mustOK(t, l.Restore(a.PID, nil))
	mustOK(t, l.Unlock(a.PID))
	wantState(t, l, b.PID, offload.Running)
}

func TestLibNotACUDAProcess(t *testing.T) {
	f := buildFake(t)
	l := openFake(t, f)
	_, err := l.State(os.Getpid())
	if !errors.Is(err, offload.ErrNoContext) {
		t.Errorf("state of the test process: %v, want ErrNoContext", err)
	}
}

func TestOpenMissingLibrary(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "libcuda.so.1"))
	if !errors.Is(err, ErrNoLibrary) || !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("Open(missing) = %v, want ErrNoLibrary", err)
	}
}

// The fake must be faithful for the tests above to mean anything: device
// memory that is not CUDA-checkpointed dies with its process.
func TestFakeReclaimsDeadProcessMemory(t *testing.T) {
	f := buildFake(t)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "128", "-delay", "5")
	dir := filepath.Join(f.Root, "mem", cudatest.UUID(0))
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("%d memory files for one context", len(ents))
	}
	r.Kill()
	// Any later allocation on the GPU sweeps the dead process's memory.
	r2 := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "5")
	ents, _ := os.ReadDir(dir)
	name, err := cudatest.Name(r2.PID)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || !strings.HasPrefix(ents[0].Name(), name+".") {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("memory files after the owner died: %v, want only pid %d's (%s)", names, r2.PID, name)
	}
}

// A process in a PID namespace of its own (as a job's under cryo run) has
// one PID there and another on the node. The driver takes, and NVML
// reports, the PID its caller sees; the PID the process has inside names
// another process on the node, or none, and reaches nothing of it.
func TestLibNamespacedProcess(t *testing.T) {
	f := buildFake(t)
	want := f.Reference(t, work...)
	l := openFake(t, f)
	attr := &syscall.SysProcAttr{Setsid: true, Cloneflags: syscall.CLONE_NEWPID}
	if os.Getuid() != 0 {
		attr.Cloneflags |= syscall.CLONE_NEWUSER
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: os.Getuid(), HostID: os.Getuid(), Size: 1}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: os.Getgid(), HostID: os.Getgid(), Size: 1}}
	}
	probe := exec.Command("/bin/true")
	probe.SysProcAttr = attr
	if err := probe.Run(); err != nil {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatalf("no PID namespace for the workload: %v", err)
		}
		t.Skipf("no PID namespace for the workload: %v", err)
	}
	r := f.StartWith(t, t.TempDir(), attr, work...)
	inner, err := cudatest.InnerPID(r.PID)
	if err != nil || inner == r.PID {
		t.Fatalf("pid %d is %d in its namespace (%v): not a namespace of its own", r.PID, inner, err)
	}

	nv, err := nvml.Open(f.LibNVML)
	if err != nil {
		t.Fatal(err)
	}
	defer nv.Close()
	held, err := nv.Holders([]int{r.PID, inner})
	if err != nil || len(held) != 1 || len(held[r.PID]) != 1 || held[r.PID][0].Memory != 256<<10 {
		t.Errorf("NVML holders of pids %d and %d: %+v, %v; want pid %d with 256 KiB", r.PID, inner, held, err, r.PID)
	}
	for _, op := range []struct {
		name string
		call func(int) error
	}{
		{"state", func(pid int) error { _, err := l.State(pid); return err }},
		{"lock", func(pid int) error { return l.Lock(pid, time.Second) }},
	} {
		if err := op.call(inner); !errors.Is(err, offload.ErrNoContext) {
			t.Errorf("%s of pid %d (the workload's pid inside its namespace): %v, want ErrNoContext", op.name, inner, err)
		}
	}

	wantState(t, l, r.PID, offload.Running)
	mustOK(t, l.Lock(r.PID, 5*time.Second))
	wantState(t, l, r.PID, offload.Locked)
	mustOK(t, l.Checkpoint(r.PID))
	wantState(t, l, r.PID, offload.Checkpointed)
	if _, held := f.DeviceBytes(cudatest.UUID(0), r.PID); held {
		t.Error("checkpointed process still holds device memory")
	}
	mustOK(t, l.Restore(r.PID, nil))
	if n, _ := f.DeviceBytes(cudatest.UUID(0), r.PID); n != 256<<10 {
		t.Errorf("restored device memory on GPU 0 = %d bytes, want %d", n, 256<<10)
	}
	mustOK(t, l.Unlock(r.PID))
	wantState(t, l, r.PID, offload.Running)
	got, err := r.Result(30 * time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, r.Output())
	}
	if got != want {
		t.Errorf("result after checkpoint/restore %s, uninterrupted %s", got, want)
	}
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
