package drivers

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda"
	"github.com/cryo-hpc/cryo/offload/cuda/cudatest"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// On a node without an NVIDIA driver the registry holds a null CUDA
// driver: a CPU job is checkpointed as if there were no GPUs (nothing is
// found, fast), and a checkpoint that recorded CUDA contexts is refused
// at restore planning with the reason, before anything starts.
func TestOpenWithoutNVIDIADriver(t *testing.T) {
	dir := t.TempDir()
	reg := Open(Config{Getenv: envOf(map[string]string{
		"CRYO_LIBCUDA": filepath.Join(dir, "libcuda.so.1"), "CRYO_LIBNVML": filepath.Join(dir, "libnvidia-ml.so.1"),
	})})
	defer reg.Close()
	d, err := reg.Driver(cuda.Kind)
	if err != nil {
		t.Fatal(err)
	}
	if _, real := d.(*cuda.Driver); real {
		t.Fatalf("the registry holds the real CUDA driver on a node without libraries")
	}
	ctx := context.Background()
	t0 := time.Now()
	for range 100 {
		cs, err := reg.Discover(ctx, []int{os.Getpid(), os.Getppid()})
		if err != nil || len(cs) != 0 {
			t.Fatalf("Discover: %v, %v; want nothing, no error", cs, err)
		}
	}
	if took := time.Since(t0); took > 50*time.Millisecond {
		t.Errorf("100 discoveries on a CPU node took %s: the null driver must not load anything", took)
	}
	g, err := offload.Quiesce(ctx, offload.QuiesceOptions{Registry: reg, Job: offload.JobRef{RootPID: os.Getpid(), Procs: []offload.ProcRef{{PID: os.Getpid()}}}})
	if err != nil || g.Len() != 0 {
		t.Fatalf("Quiesce of a CPU job: %v contexts, %v", g, err)
	}
	rec := offload.Record{Kind: cuda.Kind, PID: os.Getpid(), Devices: []offload.Device{{UUID: "GPU-aaaaaaaa-0000-4000-8000-00000000cafe", Model: "A100"}}}
	if _, err := offload.PlanRestore(ctx, reg, []offload.Record{rec}, nil); !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("planning the restore of a CUDA context: %v, want ErrNoDriver", err)
	}
	cs, err := reg.Attach([]offload.Record{rec})
	if err != nil {
		t.Fatal(err)
	}
	if err := cs[0].Lock(ctx, time.Second); !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("Lock through the null driver: %v, want ErrNoDriver", err)
	}
	if _, err := cs[0].State(ctx); !errors.Is(err, cuda.ErrNoLibrary) {
		t.Errorf("State through the null driver: %v, want it to name the missing libcuda", err)
	}
	if st := Status(reg); st.HasDriver() || st.CUDAProblem == "" || st.NVMLProblem == "" {
		t.Errorf("Status: %+v; want no driver, with both reasons", st)
	}
	if _, err := NVML(reg); !errors.Is(err, nvml.ErrNoNVML) {
		t.Errorf("NVML: %v, want ErrNoNVML", err)
	}
	if err := reg.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// With the fake NVIDIA driver, the registry holds the opened CUDA driver;
// its NVML is the one GPU health gets, and Close shuts it down.
func TestOpenWithDriverAndClose(t *testing.T) {
	f := cudatest.Build(t)
	t.Setenv("FAKECUDA_ROOT", f.Root)
	reg := Open(Config{Getenv: envOf(map[string]string{"CRYO_LIBCUDA": f.LibCUDA, "CRYO_LIBNVML": f.LibNVML})})
	d, err := reg.Driver(cuda.Kind)
	if err != nil {
		t.Fatal(err)
	}
	if _, real := d.(*cuda.Driver); !real {
		t.Fatalf("the registry holds %T, want the CUDA driver", d)
	}
	st := Status(reg)
	if !st.NVML || !st.CUDA || !st.CheckpointAPI || len(st.GPUs) != len(cudatest.DefaultGPUs()) {
		t.Errorf("status %+v", st)
	}
	lib, err := NVML(reg)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := lib.Info(); err != nil || len(info.GPUs) != len(cudatest.DefaultGPUs()) {
		t.Errorf("NVML info: %+v, %v", info, err)
	}
	if lib2, _ := NVML(reg); lib2 != lib {
		t.Errorf("a second NVML call gave another NVML")
	}
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := lib.Info(); err == nil {
		t.Errorf("NVML still answers after the registry was closed: not shut down")
	}
	if _, err := NVML(reg); !errors.Is(err, cuda.ErrClosed) {
		t.Errorf("NVML after Close: %v, want cuda.ErrClosed", err)
	}
	if err := reg.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
}
