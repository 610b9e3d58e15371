package nvml

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ErrNoNVML means NVML is not usable on this node: no libnvidia-ml, or no
// NVIDIA kernel driver. Callers treat the node as having no GPUs.
var ErrNoNVML = errors.New("NVML not available")

// DefaultLibrary is the library Open loads when no path is given.
const DefaultLibrary = "libnvidia-ml.so.1"

// Lib is an initialised NVML.
type Lib struct {
	lib gonvml.Interface

	closeOnce sync.Once
	closeErr  error
}

// Open loads NVML from path (DefaultLibrary when empty) and initialises it.
func Open(path string) (*Lib, error) {
	var opts []gonvml.LibraryOption
	if path != "" {
		opts = append(opts, gonvml.WithLibraryPath(path))
	}
	l, err := New(gonvml.New(opts...))
	if err != nil && path != "" {
		err = fmt.Errorf("%s: %w", path, err)
	}
	return l, err
}

// New initialises an NVML interface (the real library, or a mock).
func New(lib gonvml.Interface) (*Lib, error) {
	switch ret := lib.Init(); ret {
	case gonvml.SUCCESS:
		return &Lib{lib: lib}, nil
	case gonvml.ERROR_LIBRARY_NOT_FOUND:
		return nil, fmt.Errorf("%w: %s cannot be loaded", ErrNoNVML, DefaultLibrary)
	default:
		return nil, fmt.Errorf("%w: nvmlInit: %v", ErrNoNVML, ret)
	}
}

// Close shuts NVML down (nvmlShutdown), once: closing again does nothing.
// The Lib must not be used afterwards.
func (l *Lib) Close() error {
	l.closeOnce.Do(func() {
		if ret := l.lib.Shutdown(); ret != gonvml.SUCCESS {
			l.closeErr = fmt.Errorf("nvmlShutdown: %v", ret)
		}
	})
	return l.closeErr
}

// Info is the node's NVIDIA driver and GPUs.
type Info struct {
	DriverVersion string `json:"driver_version"`
	// CUDAVersion is the CUDA driver API version (1000*major + 10*minor).
	CUDAVersion int   `json:"cuda_version,omitempty"`
	GPUs        []GPU `json:"gpus"`
}

// GPU is one GPU and the processes on it.
type GPU struct {
	Index       int       `json:"index"`
	UUID        string    `json:"uuid"`
	Model       string    `json:"model"`
	MemoryTotal uint64    `json:"memory_total"`
	MemoryUsed  uint64    `json:"memory_used"`
	MemoryFree  uint64    `json:"memory_free"`
	Persistence bool      `json:"persistence_mode"`
	Processes   []Process `json:"processes,omitempty"`
}

// Process is a process that holds a compute context on a GPU.
type Process struct {
	PID    int    `json:"pid"`
	Memory uint64 `json:"memory_used"` // device memory it holds there
}

// Info reads the driver version and every GPU with its processes.
func (l *Lib) Info() (Info, error) {
	var info Info
	v, ret := l.lib.SystemGetDriverVersion()
	if ret != gonvml.SUCCESS {
		return info, fmt.Errorf("nvmlSystemGetDriverVersion: %v", ret)
	}
	info.DriverVersion = v
	if cv, ret := l.lib.SystemGetCudaDriverVersion(); ret == gonvml.SUCCESS {
		info.CUDAVersion = cv
	}
	n, ret := l.lib.DeviceGetCount()
	if ret != gonvml.SUCCESS {
		return info, fmt.Errorf("nvmlDeviceGetCount: %v", ret)
	}
	info.GPUs = []GPU{}
	for i := 0; i < n; i++ {
		g, err := l.gpu(i)
		if err != nil {
			return info, err
		}
		info.GPUs = append(info.GPUs, g)
	}
	return info, nil
}

func (l *Lib) gpu(i int) (GPU, error) {
	d, ret := l.lib.DeviceGetHandleByIndex(i)
	if ret != gonvml.SUCCESS {
		return GPU{}, fmt.Errorf("nvmlDeviceGetHandleByIndex(%d): %v", i, ret)
	}
	g := GPU{Index: i}
	if idx, ret := d.GetIndex(); ret == gonvml.SUCCESS {
		g.Index = idx
	}
	if g.UUID, ret = d.GetUUID(); ret != gonvml.SUCCESS {
		return g, fmt.Errorf("GPU %d: nvmlDeviceGetUUID: %v", i, ret)
	}
	if g.Model, ret = d.GetName(); ret != gonvml.SUCCESS {
		return g, fmt.Errorf("GPU %d: nvmlDeviceGetName: %v", i, ret)
	}
	mem, ret := d.GetMemoryInfo()
	if ret != gonvml.SUCCESS {
		return g, fmt.Errorf("GPU %d: nvmlDeviceGetMemoryInfo: %v", i, ret)
	}
	g.MemoryTotal, g.MemoryUsed, g.MemoryFree = mem.Total, mem.Used, mem.Free
	if pm, ret := d.GetPersistenceMode(); ret == gonvml.SUCCESS {
		g.Persistence = pm == gonvml.FEATURE_ENABLED
	}
	procs, ret := d.GetComputeRunningProcesses()
	if ret != gonvml.SUCCESS && ret != gonvml.ERROR_NOT_SUPPORTED {
		return g, fmt.Errorf("GPU %d: nvmlDeviceGetComputeRunningProcesses: %v", i, ret)
	}
	for _, p := range procs {
		g.Processes = append(g.Processes, Process{PID: int(p.Pid), Memory: p.UsedGpuMemory})
	}
	sort.Slice(g.Processes, func(a, b int) bool { return g.Processes[a].PID < g.Processes[b].PID })
	return g, nil
}

// Use is a GPU a process holds a context on.
type Use struct {
	GPU    GPU    // the GPU (without its process list)
	Memory uint64 // device memory the process holds there
}

// Holders returns, for each of pids that holds a compute context on some
// GPU, the GPUs it uses (in index order). PIDs on no GPU are absent.
func (l *Lib) Holders(pids []int) (map[int][]Use, error) {
	want := map[int]bool{}
	for _, p := range pids {
		want[p] = true
	}
	info, err := l.Info()
	if err != nil {
		return nil, err
	}
	out := map[int][]Use{}
	for _, g := range info.GPUs {
		procs := g.Processes
		g.Processes = nil
		for _, p := range procs {
			if want[p.PID] {
				out[p.PID] = append(out[p.PID], Use{GPU: g, Memory: p.Memory})
			}
		}
	}
	return out, nil
}

// XidEvent is an Xid error a GPU reported: a driver-detected fault (for
// example 79, "GPU has fallen off the bus").
type XidEvent struct {
	Index int       `json:"index"`
	UUID  string    `json:"uuid"`
	Xid   uint64    `json:"xid"`
	At    time.Time `json:"at"`
}

// WatchXid delivers the Xid events of every GPU that supports them to fn
// until ctx is done, then returns ctx's error. It fails at once if no GPU
// can report Xid events.
func (l *Lib) WatchXid(ctx context.Context, fn func(XidEvent)) error {
	set, ret := l.lib.EventSetCreate()
	if ret != gonvml.SUCCESS {
		return fmt.Errorf("nvmlEventSetCreate: %v", ret)
	}
	defer set.Free()
	n, ret := l.lib.DeviceGetCount()
	if ret != gonvml.SUCCESS {
		return fmt.Errorf("nvmlDeviceGetCount: %v", ret)
	}
	type dev struct {
		index int
		uuid  string
	}
	var devs []dev
	var handles []gonvml.Device
	for i := 0; i < n; i++ {
		d, ret := l.lib.DeviceGetHandleByIndex(i)
		if ret != gonvml.SUCCESS {
			continue
		}
		types, ret := d.GetSupportedEventTypes()
		if ret != gonvml.SUCCESS || types&gonvml.EventTypeXidCriticalError == 0 {
			continue
		}
		if ret := d.RegisterEvents(gonvml.EventTypeXidCriticalError, set); ret != gonvml.SUCCESS {
			continue
		}
		uuid, _ := d.GetUUID()
		devs = append(devs, dev{i, uuid})
		handles = append(handles, d)
	}
	if len(devs) == 0 {
		return errors.New("no GPU reports Xid events")
	}
	for ctx.Err() == nil {
		e, ret := set.Wait(200)
		if ret == gonvml.ERROR_TIMEOUT {
			continue
		}
		if ret != gonvml.SUCCESS {
			return fmt.Errorf("nvmlEventSetWait: %v", ret)
		}
		if e.EventType&gonvml.EventTypeXidCriticalError == 0 {
			continue
		}
		ev := XidEvent{Index: -1, Xid: e.EventData, At: time.Now()}
		for i, h := range handles {
			if h == e.Device {
				ev.Index, ev.UUID = devs[i].index, devs[i].uuid
			}
		}
		if ev.UUID == "" && e.Device != nil {
			ev.UUID, _ = e.Device.GetUUID()
		}
		fn(ev)
	}
	return ctx.Err()
}
