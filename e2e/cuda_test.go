package e2e

// End-to-end tests of CUDA jobs against the fake CUDA driver (see
// offload/cuda/testdata/fakecuda and package cudatest): the real cryo
// binary, real CRIU, a workload whose result depends on device memory that
// lives outside its address space. cryo loads the same fake (CRYO_LIBCUDA)
// and, where a test says so, the fake NVML (CRYO_LIBNVML).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
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

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda"
	"github.com/cryo-hpc/cryo/offload/cuda/cudatest"
)

const cudaSteps = 60

// cudaArgs are the workload's flags: 1 MiB of device memory, 60 steps.
var cudaArgs = []string{"-steps", strconv.Itoa(cudaSteps), "-kib", "1024"}

// cudaWorld is one test's fake GPUs, CRIU and store.
type cudaWorld struct {
	f     *cudatest.Fake
	criu  string
	dir   string
	store string
	env   []string // for cryo: the fake driver, and NVML when asked for
	lib   *cuda.Lib
}

func newCUDAWorld(t *testing.T, withNVML bool) *cudaWorld {
	t.Helper()
	criu := requireCRIU(t)
	f := fakeCUDA(t)
	dir := t.TempDir()
	w := &cudaWorld{f: f, criu: criu, dir: dir, store: filepath.Join(dir, "store"),
		env: []string{"FAKECUDA_ROOT=" + f.Root, "CRYO_LIBCUDA=" + f.LibCUDA}}
	if withNVML {
		w.env = append(w.env, "CRYO_LIBNVML="+f.LibNVML)
	} else {
		w.env = append(w.env, "CRYO_LIBNVML="+filepath.Join(dir, "no-libnvidia-ml.so.1"))
	}
	// The test asks the fake driver for states itself, as cryo does.
	t.Setenv("FAKECUDA_ROOT", f.Root)
	lib, err := cuda.Open(f.LibCUDA)
	if err != nil {
		t.Fatal(err)
	}
	w.lib = lib
	return w
}

var (
	fakeOnce sync.Once
	fakeDir  string
	fakeErr  error
)

// fakeCUDA gives the test a fake CUDA world of its own, from a build of the
// fake made once per test binary (in binDir, which TestMain removes).
func fakeCUDA(t *testing.T) *cudatest.Fake {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		skipOrFail(t, "gcc is needed to build the fake CUDA driver: "+err.Error())
	}
	fakeOnce.Do(func() {
		fakeDir = filepath.Join(binDir, "fakecuda")
		if fakeErr = os.MkdirAll(fakeDir, 0o755); fakeErr == nil {
			fakeErr = cudatest.Compile(fakeDir)
		}
	})
	if fakeErr != nil {
		t.Fatal(fakeErr)
	}
	return cudatest.New(t, fakeDir)
}

// command builds a cryo command line with the world's environment.
func (w *cudaWorld) command(ctx context.Context, extra []string, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	cmd := exec.CommandContext(ctx, bin("cryo"), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CRYO_") && !strings.HasPrefix(kv, "FAKECUDA_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(append(append(cmd.Env, "CRYO_CRIU="+w.criu), w.env...), extra...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	return cmd, &out, &errb
}

// cryo runs cryo to its end.
func (w *cudaWorld) cryo(t *testing.T, extra []string, args ...string) cryoResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd, out, errb := w.command(ctx, extra, args...)
	return runCryo(t, cmd, out, errb, args)
}

func (w *cudaWorld) state(t *testing.T, pid int) offload.State {
	t.Helper()
	st, err := w.lib.State(pid)
	if err != nil {
		t.Fatalf("state of pid %d: %v", pid, err)
	}
	return st
}

func (w *cudaWorld) wantState(t *testing.T, pid int, want offload.State) {
	t.Helper()
	if st := w.state(t, pid); st != want {
		t.Fatalf("pid %d is %v, want %v", pid, st, want)
	}
}

// start runs the workload and waits for its step n.
func (w *cudaWorld) start(t *testing.T, n int, extra ...string) *cudatest.Run {
	t.Helper()
	r := w.f.Start(t, w.dir, append(append([]string{}, cudaArgs...), append([]string{"-delay", "30"}, extra...)...)...)
	w.waitStep(t, r, n)
	return r
}

func (w *cudaWorld) waitStep(t *testing.T, r *cudatest.Run, n int) {
	t.Helper()
	if _, err := r.WaitFor("step "+strconv.Itoa(n), 30*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Output())
	}
}

// finish waits for the job's result and checks that it is the
// uninterrupted one, with every step printed once and in order.
func (w *cudaWorld) finish(t *testing.T, r *cudatest.Run, want string) {
	t.Helper()
	got, err := r.Result(60 * time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, r.Output())
	}
	if got != want {
		t.Errorf("result %s, uninterrupted run %s", got, want)
	}
	checkRun(t, "CUDA job", readProgress(t, r.Out).steps, 1, cudaSteps)
}

func (w *cudaWorld) journals(t *testing.T) []string {
	t.Helper()
	fs, _ := filepath.Glob(filepath.Join(w.store, "staging", "journal", "*.jsonl"))
	return fs
}

func (w *cudaWorld) generations(t *testing.T) int {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(w.store, "checkpoints"))
	return len(ents)
}

func (w *cudaWorld) reference(t *testing.T) string { return w.f.Reference(t, cudaArgs...) }

// TestCUDACheckpointKillRestore: a CUDA job checkpointed with --kill and
// restored finishes with the result of an uninterrupted run; its device
// memory went through the checkpoint, not around it.
func TestCUDACheckpointKillRestore(t *testing.T) {
	w := newCUDAWorld(t, false)
	want := w.reference(t)
	r := w.start(t, 10)

	res := w.cryo(t, nil, "checkpoint", "--json", "--store", w.store, "--kill", strconv.Itoa(r.PID))
	if res.code != 0 {
		t.Fatalf("checkpoint --kill: %s", res)
	}
	var cp struct {
		Offload int  `json:"offload_contexts"`
		Killed  bool `json:"killed"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &cp); err != nil || cp.Offload != 1 || !cp.Killed {
		t.Fatalf("checkpoint result %s: %+v, %v; want 1 offload context, killed", res.stdout, cp, err)
	}
	waitEnded(t, 10*time.Second, r.PID)
	if _, held := w.f.DeviceBytes(cudatest.UUID(0), r.PID); held {
		t.Error("the killed job still holds device memory")
	}
	m := manifest(t, w.store, 1)
	if len(m.Offload) != 1 || m.Offload[0].Kind != "cuda" || m.Offload[0].PID != r.PID || m.Offload[0].State != "running" {
		t.Errorf("manifest offload entries %+v", m.Offload)
	}

	res = w.cryo(t, nil, "restore", "--store", w.store)
	if res.code != 0 {
		t.Fatalf("restore: %s", res)
	}
	if pid, _ := strconv.Atoi(strings.TrimSpace(res.stdout)); pid != r.PID {
		t.Errorf("restored pid %q, want %d", res.stdout, r.PID)
	}
	w.wantState(t, r.PID, offload.Running)
	if n, _ := w.f.DeviceBytes(cudatest.UUID(0), r.PID); n != 1<<20 {
		t.Errorf("restored job holds %d bytes on GPU 0, want %d", n, 1<<20)
	}
	w.finish(t, r, want)
	if js := w.journals(t); len(js) != 0 {
		t.Errorf("journals left: %v", js)
	}
}

// TestCUDACheckpointWithoutDriverLosesGPUState is the control that keeps
// the other tests honest: without the CUDA checkpoint (cryo cannot load
// the driver, so it treats the job as CPU-only), the restored job's device
// memory is gone and it fails instead of finishing.
func TestCUDACheckpointWithoutDriverLosesGPUState(t *testing.T) {
	w := newCUDAWorld(t, false)
	r := w.start(t, 10)
	noDriver := []string{"CRYO_LIBCUDA=" + filepath.Join(w.dir, "no-libcuda.so.1")}
	if res := w.cryo(t, noDriver, "checkpoint", "--store", w.store, "--kill", strconv.Itoa(r.PID)); res.code != 0 {
		t.Fatalf("checkpoint: %s", res)
	}
	waitEnded(t, 10*time.Second, r.PID)
	if res := w.cryo(t, noDriver, "restore", "--store", w.store); res.code != 0 {
		t.Fatalf("restore: %s", res)
	}
	if _, err := r.Result(30 * time.Second); err == nil || !strings.Contains(err.Error(), "CUDA_ERROR_DEVICE_UNAVAILABLE") {
		t.Errorf("a job restored without its GPU state: %v, want CUDA_ERROR_DEVICE_UNAVAILABLE\n%s", err, r.Output())
	}
}

// TestCUDALeaveRunningCheckpoint: the default checkpoint leaves the job
// running and unlocked; the checkpoint restores to the same result later.
func TestCUDALeaveRunningCheckpoint(t *testing.T) {
	w := newCUDAWorld(t, false)
	want := w.reference(t)
	r := w.start(t, 10)
	if res := w.cryo(t, nil, "checkpoint", "--store", w.store, strconv.Itoa(r.PID)); res.code != 0 {
		t.Fatalf("checkpoint: %s", res)
	}
	w.wantState(t, r.PID, offload.Running)
	s := readProgress(t, r.Out).last()
	w.waitStep(t, r, s+3) // it goes on
	w.finish(t, r, want)
	r.Kill()
	waitEnded(t, 10*time.Second, r.PID)

	// The checkpoint is good: restored, the job runs to the same end again
	// (its lines follow the first run's in the output file).
	if res := w.cryo(t, nil, "restore", "--store", w.store); res.code != 0 {
		t.Fatalf("restore: %s", res)
	}
	w.wantState(t, r.PID, offload.Running)
	deadline := time.Now().Add(60 * time.Second)
	for len(r.Results()) < 2 && alive(r.PID) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if rs := r.Results(); len(rs) != 2 || rs[1] != want {
		t.Errorf("results %v, want the first run's and the restored run's, both %s\n%s", rs, want, r.Output())
	}
	if js := w.journals(t); len(js) != 0 {
		t.Errorf("journals left: %v", js)
	}
}

// TestCUDAFailedCheckpointLeavesJobRunning: a lock timeout, a failing CUDA
// checkpoint and a failing CRIU dump each fail the checkpoint with the
// phase in the message, and leave the job running, unlocked and unharmed.
func TestCUDAFailedCheckpointLeavesJobRunning(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inject []string // into the fake driver
		env    []string // for cryo
		args   []string
		want   []string // in cryo's message
	}{
		{name: "lock timeout", inject: []string{"busy_ms=5000"}, args: []string{"--offload-timeout", "200ms"},
			want: []string{"offload lock of the cuda context of pid", "CUDA_ERROR_TIMEOUT"}},
		{name: "checkpoint failure", inject: []string{"checkpoint_fail=2"},
			want: []string{"offload checkpoint of the cuda context of pid", "CUDA_ERROR_OUT_OF_MEMORY"}},
		{name: "dump failure", env: []string{"CRIU_FAULT=3"}, args: []string{"--kill"},
			want: []string{"offload dump", "criu"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newCUDAWorld(t, false)
			want := w.reference(t)
			r := w.start(t, 5)
			if len(tc.inject) > 0 {
				w.f.Inject(t, tc.inject...)
			}
			args := append(append([]string{"checkpoint", "--store", w.store}, tc.args...), strconv.Itoa(r.PID))
			res := w.cryo(t, tc.env, args...)
			if res.code != 1 {
				t.Fatalf("checkpoint with %s: %s; want exit 1", tc.name, res)
			}
			for _, s := range tc.want {
				if !strings.Contains(res.stderr, s) {
					t.Errorf("message lacks %q:\n%s", s, res.stderr)
				}
			}
			w.f.Inject(t)
			if r.Exited() {
				t.Fatalf("the job died:\n%s", r.Output())
			}
			w.wantState(t, r.PID, offload.Running)
			if ps := procState(r.PID); ps == 'T' {
				t.Error("the job was left stopped")
			}
			if n, _ := w.f.DeviceBytes(cudatest.UUID(0), r.PID); n != 1<<20 {
				t.Errorf("job holds %d bytes on GPU 0, want %d", n, 1<<20)
			}
			w.finish(t, r, want)
			if g := w.generations(t); g != 0 {
				t.Errorf("%d generations committed by a failed checkpoint", g)
			}
			if js := w.journals(t); len(js) != 0 {
				t.Errorf("journals left: %v", js)
			}
		})
	}
}

// TestCUDARecoverAfterCryoKilled: cryo is SIGKILLed after it checkpointed
// the job's CUDA context; the job is stuck locked until `cryo recover`, or
// the next checkpoint, brings it back.
func TestCUDARecoverAfterCryoKilled(t *testing.T) {
	for _, how := range []string{"recover", "next checkpoint"} {
		t.Run(how, func(t *testing.T) {
			w := newCUDAWorld(t, false)
			want := w.reference(t)
			r := w.start(t, 5)
			w.f.Inject(t, "checkpoint_delay_ms=1500")
			w.killCryoMidCheckpoint(t, r.PID)
			w.f.Inject(t)
			// The driver finished the checkpoint cryo asked for: the job is
			// checkpointed, and stuck.
			deadline := time.Now().Add(10 * time.Second)
			for w.state(t, r.PID) != offload.Checkpointed && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			w.wantState(t, r.PID, offload.Checkpointed)
			s := readProgress(t, r.Out).last()
			time.Sleep(300 * time.Millisecond)
			if readProgress(t, r.Out).last() > s+1 {
				t.Fatal("a checkpointed job made progress")
			}
			if len(w.journals(t)) != 1 {
				t.Fatalf("journals %v, want the killed cryo's", w.journals(t))
			}

			var res cryoResult
			if how == "recover" {
				res = w.cryo(t, nil, "recover", "--store", w.store)
				if res.code != 0 || !strings.Contains(res.stdout, "checkpointed -> running (cryo was killed during its checkpoint)") {
					t.Fatalf("recover: %s", res)
				}
			} else {
				res = w.cryo(t, nil, "checkpoint", "--store", w.store, strconv.Itoa(r.PID))
				if res.code != 0 {
					t.Fatalf("next checkpoint: %s", res)
				}
				if g := w.generations(t); g != 1 {
					t.Errorf("%d generations, want the next checkpoint's", g)
				}
			}
			w.wantState(t, r.PID, offload.Running)
			w.finish(t, r, want)
			if js := w.journals(t); len(js) != 0 {
				t.Errorf("journals left: %v", js)
			}
			if res := w.cryo(t, nil, "recover", "--store", w.store); res.code != 0 || !strings.Contains(res.stdout, "nothing to recover") {
				t.Errorf("second recover: %s", res)
			}
		})
	}
}

// killCryoMidCheckpoint starts a checkpoint and SIGKILLs cryo once its
// journal shows it asked the driver to checkpoint the context.
func (w *cudaWorld) killCryoMidCheckpoint(t *testing.T, pid int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd, _, errb := w.command(ctx, nil, "checkpoint", "--store", w.store, "--kill", strconv.Itoa(pid))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		intent := false
		for _, j := range w.journals(t) {
			b, _ := os.ReadFile(j)
			intent = intent || bytes.Contains(b, []byte(`"event":"intent","kind":"cuda","pid":`+strconv.Itoa(pid)+`,"action":"checkpoint"`))
		}
		if intent {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("cryo never got to checkpoint the CUDA context\nstderr: %s", errb)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The intent is journaled just before the request goes to the driver:
	// give the request time to arrive (the driver then takes 1.5 s).
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	t.Logf("cryo (pid %d) killed half-way through the checkpoint", cmd.Process.Pid)
}

// TestCUDARestoreDeviceMap: with NVML the checkpoint records the job's GPU,
// and `restore --device-map` puts its device memory on another GPU. A
// restore whose CUDA part fails kills the restored job and keeps the
// checkpoint.
func TestCUDARestoreDeviceMap(t *testing.T) {
	w := newCUDAWorld(t, true)
	want := w.reference(t)
	r := w.start(t, 10)
	if res := w.cryo(t, nil, "checkpoint", "--store", w.store, "--kill", strconv.Itoa(r.PID)); res.code != 0 {
		t.Fatalf("checkpoint: %s", res)
	}
	waitEnded(t, 10*time.Second, r.PID)
	m := manifest(t, w.store, 1)
	if len(m.Offload) != 1 || len(m.Offload[0].Devices) != 1 {
		t.Fatalf("manifest offload entries %+v, want one context with its GPU", m.Offload)
	}
	if d := m.Offload[0].Devices[0]; d.UUID != cudatest.UUID(0) || d.Model != cudatest.ModelA || d.Index != 0 || d.Memory != 1<<20 {
		t.Errorf("recorded GPU %+v, want GPU 0 (%s) with 1 MiB", d, cudatest.UUID(0))
	}

	// The driver fails to restore the context: the restored job cannot go
	// on, so cryo kills it, and the checkpoint stays good for another try.
	w.f.Inject(t, "restore_fail=999")
	res := w.cryo(t, nil, "restore", "--store", w.store)
	if res.code != 1 || !strings.Contains(res.stderr, "offload restore of the cuda context of pid "+strconv.Itoa(r.PID)) ||
		!strings.Contains(res.stderr, "CUDA_ERROR_UNKNOWN") || !strings.Contains(res.stderr, "the restored job was killed") {
		t.Fatalf("restore with a failing driver: %s", res)
	}
	waitEnded(t, 15*time.Second, r.PID)
	if js := w.journals(t); len(js) != 0 {
		t.Errorf("journals left after the job was killed: %v", js)
	}
	w.f.Inject(t)

	res = w.cryo(t, nil, "restore", "--json", "--store", w.store, "--device-map", "0="+cudatest.UUID(1))
	if res.code != 0 {
		t.Fatalf("restore --device-map: %s", res)
	}
	var rr struct {
		Offload   int               `json:"offload_contexts"`
		DeviceMap map[string]string `json:"device_map"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &rr); err != nil || rr.Offload != 1 || rr.DeviceMap[cudatest.UUID(0)] != cudatest.UUID(1) {
		t.Errorf("restore result %s: %+v, %v", res.stdout, rr, err)
	}
	if n, _ := w.f.DeviceBytes(cudatest.UUID(1), r.PID); n != 1<<20 {
		t.Errorf("GPU 1 holds %d bytes of the job, want %d", n, 1<<20)
	}
	if _, held := w.f.DeviceBytes(cudatest.UUID(0), r.PID); held {
		t.Error("the job still holds memory on GPU 0")
	}
	w.finish(t, r, want)
}

// TestCUDARestorePlacement: restore checks the GPUs before anything
// starts. A missing GPU is replaced by one of the same model; with no CUDA
// driver, no GPU of the model, a map onto another model, or a driver that
// cannot remap, the restore is refused with a clear message and nothing is
// restored.
func TestCUDARestorePlacement(t *testing.T) {
	w := newCUDAWorld(t, true)
	want := w.reference(t)
	r := w.start(t, 10)
	if res := w.cryo(t, nil, "checkpoint", "--store", w.store, "--kill", strconv.Itoa(r.PID)); res.code != 0 {
		t.Fatalf("checkpoint: %s", res)
	}
	waitEnded(t, 10*time.Second, r.PID)
	gpus := cudatest.DefaultGPUs()

	var env []string
	refused := func(what string, args []string, msg ...string) {
		t.Helper()
		res := w.cryo(t, env, append([]string{"restore", "--store", w.store}, args...)...)
		if res.code == 0 {
			t.Fatalf("%s: restored, want a refusal: %s", what, res)
		}
		for _, s := range msg {
			if !strings.Contains(res.stderr, s) {
				t.Errorf("%s: message lacks %q:\n%s", what, s, res.stderr)
			}
		}
		if alive(r.PID) {
			t.Fatalf("%s: the job was restored anyway", what)
		}
	}
	// A node without the CUDA driver cannot take the job.
	env = []string{"CRYO_LIBCUDA=" + filepath.Join(w.dir, "no-libcuda.so.1"), "CRYO_LIBNVML=" + filepath.Join(w.dir, "no-nvml.so.1")}
	refused("no CUDA driver", nil, "holds cuda contexts (pid "+strconv.Itoa(r.PID), "libcuda.so.1 cannot be loaded")
	env = nil
	// Only the other model is left.
	w.f.SetGPUs(t, gpus[2])
	refused("no GPU of the model", nil, "no valid device mapping", cudatest.UUID(0), "nowhere to go", "--device-map")
	refused("map onto another model", []string{"--device-map", "0=0"}, "is a "+cudatest.ModelB, "same model")
	// A same-model GPU is back, but this driver cannot restore onto it.
	w.f.SetGPUs(t, gpus[1], gpus[2])
	w.f.SetDriver(t, 12080, "570.86.10")
	refused("remap on CUDA 12.8", nil, "device remapping not supported", "13.0")
	if res := w.cryo(t, nil, "restore", "--store", w.store, "--device-map", "0=zero"); res.code != 2 {
		t.Errorf("malformed --device-map: %s; want a usage error", res)
	}

	// CUDA 13: GPU 0 is missing, GPU 1 is the same model: it goes there.
	w.f.SetDriver(t, 13000, "580.65.06")
	res := w.cryo(t, nil, "restore", "--store", w.store)
	if res.code != 0 {
		t.Fatalf("restore onto the remaining A100: %s", res)
	}
	if n, _ := w.f.DeviceBytes(cudatest.UUID(1), r.PID); n != 1<<20 {
		t.Errorf("GPU 1 holds %d bytes of the job, want %d", n, 1<<20)
	}
	w.finish(t, r, want)
}

// TestCUDAGpusCommand: `cryo gpus` on a node without a driver says so and
// exits 0; with the fake driver and NVML it lists GPUs and CUDA processes.
func TestCUDAGpusCommand(t *testing.T) {
	requireBinaries(t)
	f := fakeCUDA(t)
	dir := t.TempDir()
	run := func(env ...string) cryoResult {
		cmd := exec.Command(bin("cryo"), "gpus", "--json")
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "CRYO_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, env...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		r := cryoResult{stdout: out.String(), stderr: errb.String()}
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			r.code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return r
	}
	none := run("CRYO_LIBCUDA="+filepath.Join(dir, "none.so"), "CRYO_LIBNVML="+filepath.Join(dir, "none.so"))
	var st cuda.Status
	if none.code != 0 || json.Unmarshal([]byte(none.stdout), &st) != nil || st.HasDriver() || len(st.GPUs) != 0 {
		t.Errorf("no driver: %s", none)
	}
	w := f.Start(t, dir, "-steps", "100000", "-kib", "256", "-delay", "10", "-device", "1")
	with := run("FAKECUDA_ROOT="+f.Root, "CRYO_LIBCUDA="+f.LibCUDA, "CRYO_LIBNVML="+f.LibNVML)
	st = cuda.Status{}
	if with.code != 0 || json.Unmarshal([]byte(with.stdout), &st) != nil {
		t.Fatalf("with the fake driver: %s", with)
	}
	if !st.NVML || !st.CheckpointAPI || !st.GPURemap || st.DriverVersion != "580.65.06" || len(st.GPUs) != 3 {
		t.Fatalf("status %+v", st)
	}
	g := st.GPUs[1]
	if g.UUID != cudatest.UUID(1) || g.Model != cudatest.ModelA || g.Persistence == nil || !*g.Persistence ||
		len(g.Processes) != 1 || g.Processes[0].PID != w.PID || g.Processes[0].Memory != 256<<10 || g.Processes[0].State != "running" {
		t.Errorf("GPU 1 %+v", g)
	}
}

// The CUDA job under `cryo run` in namespaces of its own: its processes
// have one PID in the job's PID namespace and another on the node, and a
// restore brings them back in fresh namespaces, with the same inner PIDs
// and new ones on the node.

// run starts `cryo run` of the workload (cudaArgs, -delay ms) with
// namespaces on and the world's environment, for the job too.
func (w *cudaWorld) run(t *testing.T, delay int, flags ...string) *runJob {
	t.Helper()
	args := append([]string{"--store", w.store, "--namespaces", "on"}, flags...)
	args = append(append(append(args, "--", w.f.Workload), cudaArgs...), "-delay", strconv.Itoa(delay))
	env := append(append([]string{}, w.env...), w.f.Env()...)
	return startRunEnv(t, w.criu, env, false, args...)
}

// jobProcess is the workload process of a namespaced job.
type jobProcess struct {
	pid   int    // on the node
	inner int    // in the job's PID namespace
	ns    string // that namespace, "pid:[N]"
	start uint64 // its start time
}

// name is the fake driver's name of the process (see fakegpu.h).
func (p jobProcess) name() string {
	return strings.TrimSuffix(strings.TrimPrefix(p.ns, "pid:["), "]") + "-" + strconv.Itoa(p.inner)
}

// jobProcess waits for the live workload process other than old (its
// node PID; 0 for none) and returns it.
func (w *cudaWorld) jobProcess(t *testing.T, r *runJob, old int) jobProcess {
	t.Helper()
	return w.jobProcesses(t, r, 1, old)[0]
}

// jobProcesses waits for n live workload processes, none of them one of
// old (node PIDs), and returns them by the GPU index each was started on.
func (w *cudaWorld) jobProcesses(t *testing.T, r *runJob, n int, old ...int) map[int]jobProcess {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		found := map[int]jobProcess{}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || slices.Contains(old, pid) || !alive(pid) {
				continue
			}
			if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err != nil || exe != w.f.Workload {
				continue
			}
			ns, err := os.Readlink("/proc/" + e.Name() + "/ns/pid")
			inner, ierr := cudatest.InnerPID(pid)
			b, cerr := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil || ierr != nil || cerr != nil {
				continue
			}
			dev := 0
			if args := strings.Split(string(b), "\x00"); slices.Index(args, "-device") >= 0 && slices.Index(args, "-device")+1 < len(args) {
				dev, _ = strconv.Atoi(args[slices.Index(args, "-device")+1])
			}
			found[dev] = jobProcess{pid: pid, inner: inner, ns: ns, start: cudatest.StartTime(pid)}
		}
		if len(found) == n {
			return found
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d workload processes of the job after 30s, want %d\ncryo said:\n%s", len(found), n, r.messages(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitJobStep waits until the job's output shows step n or later (after
// its "ready" line), and fails when it shows its end or a CUDA error.
func waitJobStep(t *testing.T, r *runJob, n int) { waitFileStep(t, r, r.out, n) }

// waitFileStep is waitJobStep for a workload that writes to out.
func waitFileStep(t *testing.T, r *runJob, out string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		p := readProgress(t, out)
		if p.last() >= n {
			return
		}
		for _, line := range p.other {
			if !strings.HasPrefix(line, "ready ") {
				t.Fatalf("waiting for step %d: the job printed %q\ncryo said:\n%s", n, line, r.messages(t))
			}
		}
		if p.result != "" || time.Now().After(deadline) {
			t.Fatalf("no step %d (result %q)\ncryo said:\n%s", n, p.result, r.messages(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// namespaced checks that the job's process is in a PID namespace of its
// own, with a PID there that is not its PID on the node.
func namespaced(t *testing.T, p jobProcess) {
	t.Helper()
	if own, _ := os.Readlink("/proc/self/ns/pid"); p.ns == own || p.inner == p.pid {
		t.Fatalf("the job's process (pid %d, %d inside, %s) is not in a PID namespace of its own", p.pid, p.inner, p.ns)
	}
}

// memoryOf lists the memory files of a process on a fake GPU (by index),
// by its name and start time (a later process may have the same name: the
// kernel reuses the inode numbers of namespaces that are gone).
func (w *cudaWorld) memoryOf(gpu int, p jobProcess) []string {
	ents, _ := os.ReadDir(filepath.Join(w.f.Root, "mem", cudatest.UUID(gpu)))
	var out []string
	for _, e := range ents {
		f := strings.SplitN(e.Name(), ".", 3)
		if len(f) != 3 || f[0] != p.name() {
			continue
		}
		if s, err := strconv.ParseUint(f[1], 10, 64); err == nil && s+1 >= p.start && s <= p.start+1 {
			out = append(out, e.Name())
		}
	}
	return out
}

// restoredOnGPU checks that the restored job's context was restored onto
// GPU 0 and unlocked: the driver, asked by its PID on the node, says it
// runs, and it holds its 1 MiB there again.
func (w *cudaWorld) restoredOnGPU(t *testing.T, before, after jobProcess) {
	t.Helper()
	w.restoredOn(t, 0, before, after)
}

// restoredOn is restoredOnGPU for a process of the job on GPU gpu.
func (w *cudaWorld) restoredOn(t *testing.T, gpu int, before, after jobProcess) {
	t.Helper()
	namespaced(t, after)
	// (The fresh namespace may have the inode number of the old one: the
	// kernel reuses them once a namespace is gone.)
	if after.inner != before.inner {
		t.Errorf("restored process: pid %d inside its namespace, want %d as before", after.inner, before.inner)
	}
	w.wantState(t, after.pid, offload.Running)
	if n, _ := w.f.DeviceBytes(cudatest.UUID(gpu), after.pid); n != 1<<20 {
		t.Errorf("restored job (pid %d) holds %d bytes on GPU %d, want %d", after.pid, n, gpu, 1<<20)
	}
}

// checkJobPID checks a generation's record of the job's CUDA context: by
// its PID on the node when checkpointed, and by its PID in the job's
// namespace, which a restore finds it by.
func (w *cudaWorld) checkJobPID(t *testing.T, gen int, p jobProcess) {
	t.Helper()
	m := manifest(t, w.store, gen)
	if len(m.Offload) != 1 || m.Offload[0].Kind != "cuda" || m.Offload[0].JobPID != p.inner || m.Offload[0].State != "running" {
		t.Fatalf("generation %d's offload entries %+v, want one cuda context with job_pid %d", gen, m.Offload, p.inner)
	}
}

// TestCUDARunNamespacedRestoresKilledJob: a CUDA job under cryo run, in
// namespaces of its own, checkpointed every second; its process is killed
// mid-run. cryo restores it in fresh namespaces, where it has a new PID on
// the node; its CUDA context is restored onto the GPU and unlocked, and it
// finishes with an uninterrupted run's result, each step printed once.
func TestCUDARunNamespacedRestoresKilledJob(t *testing.T) {
	w := newCUDAWorld(t, true)
	want := w.reference(t)
	r := w.run(t, 80, "--interval", "1s")
	first := w.jobProcess(t, r, 0)
	namespaced(t, first)
	waitJobStep(t, r, 1) // its context exists
	// The driver answers for the job's process by its PID on the node.
	w.wantState(t, first.pid, offload.Running)
	if n, _ := w.f.DeviceBytes(cudatest.UUID(0), first.pid); n != 1<<20 {
		t.Fatalf("the job holds %d bytes on GPU 0, want %d", n, 1<<20)
	}

	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	w.checkJobPID(t, 1, first)
	at := readProgress(t, r.out).last()
	waitJobStep(t, r, at+2)
	if err := syscall.Kill(first.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killedAt := readProgress(t, r.out).last()
	r.waitFor(t, "restored: generation", 60*time.Second)
	second := w.jobProcess(t, r, first.pid)
	w.restoredOnGPU(t, first, second)

	if code := r.wait(t, 90*time.Second); code != 0 {
		t.Fatalf("cryo run exited %d, want 0\ncryo said:\n%s", code, r.messages(t))
	}
	p := readProgress(t, r.out)
	if killedAt >= cudaSteps {
		t.Fatalf("the job ended before it was killed: the test proves nothing")
	}
	if p.result != want {
		t.Errorf("result %q, uninterrupted run %q\ncryo said:\n%s", p.result, want, r.messages(t))
	}
	checkRun(t, "CUDA job restored in fresh namespaces", p.steps, 1, cudaSteps)
	if left := w.memoryOf(0, first); len(left) > 0 {
		t.Errorf("the killed process's device memory was never freed: %v", left)
	}
}

// TestCUDARunNamespacedStopAndResume: `cryo ctl stop` checkpoints a
// namespaced CUDA job (its device memory into the checkpoint) and ends it;
// `cryo run` again resumes it in fresh namespaces from there, and it
// finishes with an uninterrupted run's result. Without NVML here: cryo
// finds the CUDA process by asking the driver about each of the job's.
func TestCUDARunNamespacedStopAndResume(t *testing.T) {
	w := newCUDAWorld(t, false)
	want := w.reference(t)
	r := w.run(t, 60)
	first := w.jobProcess(t, r, 0)
	namespaced(t, first)
	waitJobStep(t, r, 10)
	if res := w.cryo(t, nil, "ctl", "--store", w.store, "stop"); res.code != 0 {
		t.Fatalf("ctl stop: %s", res)
	}
	if code := r.wait(t, 30*time.Second); code != 143 {
		t.Fatalf("cryo run after ctl stop exited %d, want 143\ncryo said:\n%s", code, r.messages(t))
	}
	if !strings.Contains(r.messages(t), "stopped: checkpointed as generation 1") {
		t.Fatalf("ctl stop did not checkpoint:\n%s", r.messages(t))
	}
	waitEnded(t, 10*time.Second, first.pid)
	w.checkJobPID(t, 1, first)
	// Its device memory went into the checkpoint (the driver released it
	// there), not down with the process.
	if left := w.memoryOf(0, first); len(left) > 0 {
		t.Errorf("the stopped job's device memory was not checkpointed: %v still on GPU 0", left)
	}
	stoppedAt := readProgress(t, r.out).last()
	if stoppedAt >= cudaSteps {
		t.Fatalf("the job finished before it could be stopped")
	}

	r2 := w.run(t, 60)
	r2.waitFor(t, "restored: generation 1", 60*time.Second)
	second := w.jobProcess(t, r2, first.pid)
	w.restoredOnGPU(t, first, second)
	if code := r2.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("resumed cryo run exited %d\ncryo said:\n%s", code, r2.messages(t))
	}
	// The restored job goes on writing the output file it had.
	p := readProgress(t, r.out)
	if p.result != want {
		t.Errorf("result %q, uninterrupted run %q\ncryo said:\n%s", p.result, want, r2.messages(t))
	}
	checkRun(t, "CUDA job stopped and resumed", p.steps, 1, cudaSteps)
}

// TestCUDARunNamespacedGPUFailure: a namespaced job of two CUDA processes,
// each on a GPU of its own; GPU 1 reports an Xid 79 mid-run. cryo, which
// sees the job's processes by their PIDs on the node, finds that the Xid
// hit the job, and restores both in fresh namespaces, each context onto
// its GPU in the process that held it; both finish with an uninterrupted
// run's result.
func TestCUDARunNamespacedGPUFailure(t *testing.T) {
	w := newCUDAWorld(t, true)
	want := w.reference(t)
	outs := map[int]string{0: filepath.Join(w.dir, "gpu0.out"), 1: filepath.Join(w.dir, "gpu1.out")}
	work := func(gpu int) string {
		return fmt.Sprintf("%s %s -delay 80 -device %d >>%s", w.f.Workload, strings.Join(cudaArgs, " "), gpu, outs[gpu])
	}
	args := []string{"--store", w.store, "--namespaces", "on", "--interval", "1s", "--",
		"/bin/sh", "-c", work(1) + " & " + work(0) + "; wait"}
	r := startRunEnv(t, w.criu, append(append([]string{}, w.env...), w.f.Env()...), false, args...)
	before := w.jobProcesses(t, r, 2)
	for gpu := range before {
		waitFileStep(t, r, outs[gpu], 1) // its context exists
	}
	for gpu, p := range before {
		namespaced(t, p)
		w.wantState(t, p.pid, offload.Running)
		if n, _ := w.f.DeviceBytes(cudatest.UUID(gpu), p.pid); n != 1<<20 {
			t.Fatalf("the job's process on GPU %d holds %d bytes there, want %d", gpu, n, 1<<20)
		}
	}

	r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
	m := manifest(t, w.store, 1)
	byJobPID := map[int]int{} // job_pid -> GPU index
	for _, o := range m.Offload {
		if len(o.Devices) == 1 {
			byJobPID[o.JobPID] = o.Devices[0].Index
		}
	}
	if len(m.Offload) != 2 || byJobPID[before[0].inner] != 0 || byJobPID[before[1].inner] != 1 {
		t.Fatalf("generation 1's offload entries %+v, want job_pid %d on GPU 0 and %d on GPU 1", m.Offload, before[0].inner, before[1].inner)
	}
	waitFileStep(t, r, outs[1], readProgress(t, outs[1]).last()+2)
	w.f.Xid(t, cudatest.UUID(1), 79)
	r.waitFor(t, "restored: generation", 60*time.Second)
	if msgs := r.messages(t); !strings.Contains(msgs, "Xid 79 on GPU 1 ("+cudatest.UUID(1)+")") {
		t.Errorf("cryo did not report the Xid on the job's GPU as its failure:\n%s", msgs)
	}
	after := w.jobProcesses(t, r, 2, before[0].pid, before[1].pid)
	for gpu := range before {
		w.restoredOn(t, gpu, before[gpu], after[gpu])
	}

	if code := r.wait(t, 90*time.Second); code != 0 {
		t.Fatalf("cryo run exited %d, want 0\ncryo said:\n%s", code, r.messages(t))
	}
	for gpu, out := range outs {
		// Appended to by each run: the restored ones go on after the
		// lines of those that were ended.
		p := readProgress(t, out)
		if p.result != want || strings.Count(string(readOrEmpty(out)), "result ") != 1 {
			t.Errorf("the job's process on GPU %d: result %q, want one, %q (steps %s)", gpu, p.result, want, compact(p.steps))
		}
		if p.last() != cudaSteps {
			t.Errorf("the job's process on GPU %d ended at step %d, want %d", gpu, p.last(), cudaSteps)
		}
	}
}
