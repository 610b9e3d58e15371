package cuda

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

// countedNVML is a DGX A100 mock that counts nvmlInit and nvmlShutdown
// and fails calls made while NVML is not initialised, as NVML does.
func countedNVML(t *testing.T) (open func(string) (*nvml.Lib, error), inits, shutdowns *int) {
	t.Helper()
	s := dgxa100.New()
	for _, d := range s.Devices {
		dev := d.(*dgxa100.Device)
		dev.MemoryInfo = gonvml.Memory{Total: 40 << 30, Free: 40 << 30}
		dev.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) { return nil, gonvml.SUCCESS }
		dev.GetPersistenceModeFunc = func() (gonvml.EnableState, gonvml.Return) { return gonvml.FEATURE_ENABLED, gonvml.SUCCESS }
	}
	inits, shutdowns = new(int), new(int)
	live := false
	s.InitFunc = func() gonvml.Return { *inits++; live = true; return gonvml.SUCCESS }
	s.ShutdownFunc = func() gonvml.Return {
		if !live {
			return gonvml.ERROR_UNINITIALIZED
		}
		*shutdowns++
		live = false
		return gonvml.SUCCESS
	}
	count := s.DeviceGetCountFunc
	s.DeviceGetCountFunc = func() (int, gonvml.Return) {
		if !live {
			return 0, gonvml.ERROR_UNINITIALIZED
		}
		return count()
	}
	return func(string) (*nvml.Lib, error) { return nvml.New(s) }, inits, shutdowns
}

// A process opens the driver once, uses it for many checkpoints, and
// closes it: NVML is initialised once and shut down once.
func TestDriverOpensNVMLOnceAndClosesIt(t *testing.T) {
	open, inits, shutdowns := countedNVML(t)
	d := withAPI(New(Config{}), &fakeAPI{version: 13000}, nil)
	d.openNVML = open
	if err := d.Open(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := d.Discover(context.Background(), []int{os.Getpid()}); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Inventory(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	lib, err := d.NVML()
	if err != nil {
		t.Fatal(err)
	}
	if *inits != 1 || *shutdowns != 0 {
		t.Errorf("before Close: %d nvmlInit, %d nvmlShutdown; want 1 and 0", *inits, *shutdowns)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
	if *inits != 1 || *shutdowns != 1 {
		t.Errorf("after Close: %d nvmlInit, %d nvmlShutdown; want 1 and 1", *inits, *shutdowns)
	}
	if _, err := lib.Info(); err == nil {
		t.Errorf("NVML still answers after Close")
	}
	if _, err := d.NVML(); !errors.Is(err, ErrClosed) {
		t.Errorf("NVML after Close: %v, want ErrClosed", err)
	}
}

// Closing a driver that never needed NVML does not load it.
func TestCloseUnusedDriverLoadsNothing(t *testing.T) {
	open, inits, _ := countedNVML(t)
	d := New(Config{})
	d.openNVML = open
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Discover(context.Background(), []int{os.Getpid()}); err != nil && !errors.Is(err, ErrClosed) {
		t.Logf("Discover after Close: %v", err)
	}
	if *inits != 0 {
		t.Errorf("Close (or use after it) initialised NVML %d times", *inits)
	}
}

// A given NVML is its giver's: Close leaves it alone.
func TestCloseLeavesAGivenNVML(t *testing.T) {
	open, _, shutdowns := countedNVML(t)
	nv, err := open("")
	if err != nil {
		t.Fatal(err)
	}
	d := New(Config{NVML: nv})
	if _, err := d.Inventory(context.Background()); err == nil {
		t.Log("inventory without libcuda answered")
	}
	if err := d.Close(); err != nil || *shutdowns != 0 {
		t.Errorf("Close: %v, %d nvmlShutdown; want none", err, *shutdowns)
	}
}

func TestOpenWithoutAnyDriver(t *testing.T) {
	dir := t.TempDir()
	d := New(Config{LibCUDA: filepath.Join(dir, "libcuda.so.1"), LibNVML: filepath.Join(dir, "libnvidia-ml.so.1")})
	err := d.Open()
	if !errors.Is(err, ErrNoLibrary) || !errors.Is(err, nvml.ErrNoNVML) || !errors.Is(err, offload.ErrNoDriver) {
		t.Errorf("Open on a node without NVIDIA driver: %v; want ErrNoLibrary and ErrNoNVML", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}
