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
	"os"
	"os/exec"
	"path/filepath"
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
