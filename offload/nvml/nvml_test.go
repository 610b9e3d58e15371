package nvml

import (
	"context"
	"errors"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
)

// server is a DGX A100 mock whose GPUs 0 and 3 hold the given processes.
func server(t *testing.T, procs map[int][]gonvml.ProcessInfo) *dgxa100.Server {
	t.Helper()
	s := dgxa100.New()
	for i, d := range s.Devices {
		dev := d.(*dgxa100.Device)
		dev.MemoryInfo = gonvml.Memory{Total: 40 << 30, Used: 0, Free: 40 << 30}
		ps := procs[i]
		for _, p := range ps {
			dev.MemoryInfo.Used += p.UsedGpuMemory
			dev.MemoryInfo.Free -= p.UsedGpuMemory
		}
		dev.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) { return ps, gonvml.SUCCESS }
		persist := gonvml.FEATURE_ENABLED
		if i%2 == 1 {
			persist = gonvml.FEATURE_DISABLED
		}
		dev.GetPersistenceModeFunc = func() (gonvml.EnableState, gonvml.Return) { return persist, gonvml.SUCCESS }
	}
	return s
}

func TestInfoReadsEveryGPU(t *testing.T) {
	s := server(t, map[int][]gonvml.ProcessInfo{
		0: {{Pid: 4242, UsedGpuMemory: 3 << 30}},
		3: {{Pid: 4243, UsedGpuMemory: 1 << 30}, {Pid: 4242, UsedGpuMemory: 2 << 30}},
	})
	l, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.DriverVersion != "550.54.15" || info.CUDAVersion != 12040 {
		t.Errorf("driver %q cuda %d, want 550.54.15 and 12040", info.DriverVersion, info.CUDAVersion)
	}
	if len(info.GPUs) != 8 {
		t.Fatalf("%d GPUs, want 8", len(info.GPUs))
	}
	g0, g3 := info.GPUs[0], info.GPUs[3]
	if g0.UUID != s.Devices[0].(*dgxa100.Device).UUID || g0.Model != "Mock NVIDIA A100-SXM4-40GB" || g0.Index != 0 {
		t.Errorf("GPU 0 = %+v", g0)
	}
	if g0.MemoryTotal != 40<<30 || g0.MemoryUsed != 3<<30 || g0.MemoryFree != 37<<30 {
		t.Errorf("GPU 0 memory total %d used %d free %d", g0.MemoryTotal, g0.MemoryUsed, g0.MemoryFree)
	}
	if !g0.Persistence || info.GPUs[1].Persistence {
		t.Errorf("persistence: GPU 0 %v (want on), GPU 1 %v (want off)", g0.Persistence, info.GPUs[1].Persistence)
	}
	if len(g3.Processes) != 2 || g3.Processes[0].PID != 4242 || g3.Processes[1].PID != 4243 {
		t.Errorf("GPU 3 processes = %+v, want 4242 and 4243 in PID order", g3.Processes)
	}
}

func TestHoldersMapsPIDsToGPUs(t *testing.T) {
	s := server(t, map[int][]gonvml.ProcessInfo{
		0: {{Pid: 100, UsedGpuMemory: 1 << 30}},
		5: {{Pid: 100, UsedGpuMemory: 2 << 30}, {Pid: 999, UsedGpuMemory: 5 << 30}},
		6: {{Pid: 101, UsedGpuMemory: 7 << 20}},
	})
	l, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	h, err := l.Holders([]int{100, 101, 102})
	if err != nil {
		t.Fatal(err)
	}
	if len(h) != 2 {
		t.Fatalf("holders %v, want pids 100 and 101 only (102 holds nothing, 999 is not the job's)", h)
	}
	if u := h[100]; len(u) != 2 || u[0].GPU.Index != 0 || u[0].Memory != 1<<30 || u[1].GPU.Index != 5 || u[1].Memory != 2<<30 {
		t.Errorf("pid 100 uses %+v, want GPU 0 (1 GiB) and GPU 5 (2 GiB)", u)
	}
	if u := h[101]; len(u) != 1 || u[0].GPU.UUID != s.Devices[6].(*dgxa100.Device).UUID || len(u[0].GPU.Processes) != 0 {
		t.Errorf("pid 101 uses %+v, want GPU 6 without its process list", u)
	}
}

func TestNoLibraryIsErrNoNVML(t *testing.T) {
	for _, ret := range []gonvml.Return{gonvml.ERROR_LIBRARY_NOT_FOUND, gonvml.ERROR_DRIVER_NOT_LOADED} {
		m := &mock.Interface{InitFunc: func() gonvml.Return { return ret }}
		if _, err := New(m); !errors.Is(err, ErrNoNVML) {
			t.Errorf("Init returning %v: err = %v, want ErrNoNVML", ret, err)
		}
	}
	// And the real loader on a path that does not exist.
	if _, err := Open(t.TempDir() + "/libnvidia-ml.so.1"); !errors.Is(err, ErrNoNVML) {
		t.Errorf("Open(missing) = %v, want ErrNoNVML", err)
	}
}

func TestWatchXidDeliversEvents(t *testing.T) {
	s := server(t, nil)
	var registered int
	for i, d := range s.Devices {
		dev := d.(*dgxa100.Device)
		supported := uint64(gonvml.EventTypeXidCriticalError)
		if i == 7 {
			supported = 0 // this GPU cannot report Xids: it is skipped
		}
		dev.GetSupportedEventTypesFunc = func() (uint64, gonvml.Return) { return supported, gonvml.SUCCESS }
		dev.RegisterEventsFunc = func(types uint64, _ gonvml.EventSet) gonvml.Return {
			if types != gonvml.EventTypeXidCriticalError {
				t.Errorf("registered %#x, want Xid events", types)
			}
			registered++
			return gonvml.SUCCESS
		}
	}
	events := []gonvml.EventData{
		{Device: s.Devices[2], EventType: gonvml.EventTypeXidCriticalError, EventData: 79},
		{Device: s.Devices[4], EventType: gonvml.EventTypeXidCriticalError, EventData: 48},
	}
	freed := false
	set := &mock.EventSet{
		WaitFunc: func(uint32) (gonvml.EventData, gonvml.Return) {
			if len(events) == 0 {
				time.Sleep(time.Millisecond)
				return gonvml.EventData{}, gonvml.ERROR_TIMEOUT
			}
			e := events[0]
			events = events[1:]
			return e, gonvml.SUCCESS
		},
		FreeFunc: func() gonvml.Return { freed = true; return gonvml.SUCCESS },
	}
	s.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) { return set, gonvml.SUCCESS }
	l, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var got []XidEvent
	err = l.WatchXid(ctx, func(e XidEvent) {
		got = append(got, e)
		if len(got) == 2 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("WatchXid = %v, want context.Canceled", err)
	}
	if registered != 7 {
		t.Errorf("registered Xid events on %d GPUs, want 7", registered)
	}
	if len(got) != 2 || got[0].Xid != 79 || got[0].Index != 2 || got[0].UUID != s.Devices[2].(*dgxa100.Device).UUID || got[1].Xid != 48 || got[1].Index != 4 {
		t.Errorf("events %+v, want Xid 79 on GPU 2 then Xid 48 on GPU 4", got)
	}
	if !freed {
		t.Error("event set not freed")
	}
}
