package cuda

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda/cudatest"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

// fakeAPI is a CUDA driver that only answers what the Driver asks first.
type fakeAPI struct {
	version int
	apiErr  error
	devices []DeviceInfo
}

func (f *fakeAPI) Version() int                     { return f.version }
func (f *fakeAPI) Layout() Layout                   { return LayoutFor(f.version) }
func (f *fakeAPI) APIError() error                  { return f.apiErr }
func (f *fakeAPI) State(int) (offload.State, error) { return offload.Running, nil }
func (f *fakeAPI) Lock(int, time.Duration) error    { return nil }
func (f *fakeAPI) Checkpoint(int) error             { return nil }
func (f *fakeAPI) Restore(int, []Pair) error        { return nil }
func (f *fakeAPI) Unlock(int) error                 { return nil }
func (f *fakeAPI) Devices() ([]DeviceInfo, error)   { return f.devices, nil }
func (f *fakeAPI) RemapError() error {
	if f.version < MinRemapVersion {
		return errors.New("the CUDA driver here is 12.8; restoring onto other GPUs needs CUDA 13.0 (driver r580) or newer")
	}
	return nil
}

// dgx is a DGX A100 (go-nvml's mock) where pid 700 holds 3 GiB on GPU 2
// and 1 GiB on GPU 5, and pid 800 (not the job's) 2 GiB on GPU 2.
func dgx(t *testing.T) (*dgxa100.Server, *nvml.Lib) {
	t.Helper()
	s := dgxa100.New()
	procs := map[int][]gonvml.ProcessInfo{
		2: {{Pid: 700, UsedGpuMemory: 3 << 30}, {Pid: 800, UsedGpuMemory: 2 << 30}},
		5: {{Pid: 700, UsedGpuMemory: 1 << 30}},
	}
	for i, d := range s.Devices {
		dev := d.(*dgxa100.Device)
		ps := procs[i]
		var used uint64
		for _, p := range ps {
			used += p.UsedGpuMemory
		}
		dev.MemoryInfo = gonvml.Memory{Total: 40 << 30, Used: used, Free: 40<<30 - used}
		dev.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) { return ps, gonvml.SUCCESS }
		dev.GetPersistenceModeFunc = func() (gonvml.EnableState, gonvml.Return) { return gonvml.FEATURE_ENABLED, gonvml.SUCCESS }
	}
	l, err := nvml.New(s)
	if err != nil {
		t.Fatal(err)
	}
	return s, l
}

func withAPI(d *Driver, a api, err error) *Driver {
	d.openAPI = func(string) (api, error) {
		if err != nil {
			return nil, err
		}
		return a, nil
	}
	return d
}

func TestDiscoverWithNVMLRecordsGPUs(t *testing.T) {
	s, nv := dgx(t)
	d := withAPI(New(Config{NVML: nv}), &fakeAPI{version: 13000}, nil)
	cs, err := d.Discover(context.Background(), []int{1, 700, 701})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 {
		t.Fatalf("%d contexts, want 1 (pid 700)", len(cs))
	}
	rec := cs[0].Record()
	if rec.Kind != "cuda" || rec.PID != 700 || len(rec.Devices) != 2 {
		t.Fatalf("record %+v", rec)
	}
	g2 := s.Devices[2].(*dgxa100.Device)
	if d0 := rec.Devices[0]; d0.UUID != g2.UUID || d0.Model != g2.Name || d0.Index != 2 || d0.Memory != 3<<30 {
		t.Errorf("first device %+v, want GPU 2 with 3 GiB", d0)
	}
	if d1 := rec.Devices[1]; d1.Index != 5 || d1.Memory != 1<<30 {
		t.Errorf("second device %+v, want GPU 5 with 1 GiB", d1)
	}
}

func TestDiscoverWithNVMLButNoCheckpointAPI(t *testing.T) {
	_, nv := dgx(t)
	for name, d := range map[string]*Driver{
		"no libcuda":  withAPI(New(Config{NVML: nv}), nil, ErrNoLibrary),
		"driver r550": withAPI(New(Config{NVML: nv}), &fakeAPI{version: 12040, apiErr: ErrNoCheckpointAPI}, nil),
	} {
		_, err := d.Discover(context.Background(), []int{700})
		if !errors.Is(err, offload.ErrNoDriver) || !strings.Contains(err.Error(), "pid 700 on GPU 2") {
			t.Errorf("%s: %v, want ErrNoDriver naming pid 700 on GPU 2", name, err)
		}
	}
}

func TestDiscoverCPUJobNeverLoadsLibcuda(t *testing.T) {
	_, nv := dgx(t)
	loaded := false
	d := New(Config{NVML: nv})
	d.openAPI = func(string) (api, error) { loaded = true; return &fakeAPI{version: 13000}, nil }
	cs, err := d.Discover(context.Background(), []int{1, 2, 3})
	if err != nil || len(cs) != 0 {
		t.Fatalf("CPU job: %v, %v", cs, err)
	}
	if loaded {
		t.Error("libcuda was loaded for a job that NVML shows on no GPU")
	}
}

func TestDiscoverWithoutAnyDriver(t *testing.T) {
	dir := t.TempDir()
	d := New(Config{LibCUDA: filepath.Join(dir, "libcuda.so.1"), LibNVML: filepath.Join(dir, "libnvidia-ml.so.1")})
	t0 := time.Now()
	cs, err := d.Discover(context.Background(), []int{os.Getpid()})
	if err != nil || len(cs) != 0 {
		t.Errorf("node without NVIDIA driver: %v, %v; want nothing and no error", cs, err)
	}
	if took := time.Since(t0); took > 200*time.Millisecond {
		t.Errorf("discovery on a CPU node took %s", took)
	}
	if _, err := d.Inventory(context.Background()); !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("Inventory without a driver: %v, want ErrNoDriver", err)
	}
	if st := d.Status(); st.HasDriver() || len(st.GPUs) != 0 {
		t.Errorf("Status without a driver: %+v", st)
	}
}

func TestInventoryFromNVML(t *testing.T) {
	s, nv := dgx(t)
	d := withAPI(New(Config{NVML: nv}), &fakeAPI{version: 12080}, nil)
	inv, err := d.Inventory(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(inv.GPUs) != 8 || !inv.GPUs[2].FreeKnown || inv.GPUs[2].MemoryFree != 35<<30 || inv.GPUs[2].UUID != s.Devices[2].(*dgxa100.Device).UUID {
		t.Errorf("GPU 2 = %+v", inv.GPUs[2])
	}
	if inv.CanRemap || !strings.Contains(inv.RemapWhy, "13.0") {
		t.Errorf("12.8 driver: CanRemap %v, why %q", inv.CanRemap, inv.RemapWhy)
	}
}

// Without NVML, with libcuda: the fake driver finds the CUDA process by
// asking each PID for its state, and lists GPUs through the driver API.
func TestDiscoverWithoutNVMLAsksEachPID(t *testing.T) {
	f := buildFake(t)
	t.Setenv("FAKECUDA_ROOT", f.Root)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "64", "-delay", "5")
	d := New(Config{LibCUDA: f.LibCUDA, LibNVML: filepath.Join(t.TempDir(), "absent.so")})
	cs, err := d.Discover(context.Background(), []int{os.Getpid(), r.PID, os.Getppid()})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || cs[0].Record().PID != r.PID || len(cs[0].Record().Devices) != 0 {
		t.Fatalf("contexts %v, want the workload's only, GPUs unknown", cs)
	}
	inv, err := d.Inventory(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(inv.GPUs) != 3 || inv.GPUs[1].UUID != cudatest.UUID(1) || inv.GPUs[2].Model != cudatest.ModelB || inv.GPUs[0].FreeKnown || inv.GPUs[0].MemoryTotal != 64<<20 || !inv.CanRemap {
		t.Errorf("inventory from the CUDA driver: %+v", inv)
	}
	st := d.Status()
	if st.NVML || !st.CUDA || !st.CheckpointAPI || st.GPUsFrom != "cuda" || len(st.GPUs) != 3 {
		t.Errorf("status %+v", st)
	}
}

// With the fake NVML, discovery records the GPU and the memory held.
func TestDiscoverWithFakeNVML(t *testing.T) {
	f := buildFake(t)
	t.Setenv("FAKECUDA_ROOT", f.Root)
	r := f.Start(t, t.TempDir(), "-steps", "100000", "-kib", "512", "-delay", "5", "-device", "1")
	d := New(Config{LibCUDA: f.LibCUDA, LibNVML: f.LibNVML})
	cs, err := d.Discover(context.Background(), []int{os.Getpid(), r.PID})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 {
		t.Fatalf("contexts %v", cs)
	}
	rec := cs[0].Record()
	if len(rec.Devices) != 1 || rec.Devices[0].UUID != cudatest.UUID(1) || rec.Devices[0].Index != 1 || rec.Devices[0].Memory != 512<<10 || rec.Devices[0].Model != cudatest.ModelA {
		t.Errorf("record %+v", rec)
	}
	st := d.Status()
	if !st.NVML || st.DriverVersion != "580.65.06" || len(st.GPUs) != 3 || len(st.GPUs[1].Processes) != 1 || st.GPUs[1].Processes[0].State != "running" {
		t.Errorf("status %+v", st)
	}
}

// Xid events reach the monitor's watcher through NVML (here the fake's).
func TestFakeNVMLXidEvents(t *testing.T) {
	f := buildFake(t)
	t.Setenv("FAKECUDA_ROOT", f.Root)
	nv, err := nvml.Open(f.LibNVML)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := make(chan nvml.XidEvent, 1)
	done := make(chan error, 1)
	go func() {
		done <- nv.WatchXid(ctx, func(e nvml.XidEvent) {
			got <- e
			cancel()
		})
	}()
	time.Sleep(100 * time.Millisecond) // events before the watch began are not delivered
	f.Xid(t, cudatest.UUID(1), 79)
	select {
	case e := <-got:
		if e.Xid != 79 || e.UUID != cudatest.UUID(1) || e.Index != 1 {
			t.Errorf("event %+v, want Xid 79 on GPU 1", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no Xid event")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("WatchXid = %v", err)
	}
}
