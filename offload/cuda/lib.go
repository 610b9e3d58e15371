package cuda

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

static void *cryo_dlopen(const char *path) { return dlopen(path, RTLD_NOW | RTLD_LOCAL); }
static const char *cryo_dlerror(void) { const char *e = dlerror(); return e ? e : "unknown dlopen error"; }

typedef int (*cryo_fn_u)(unsigned int);
typedef int (*cryo_fn_pi)(int *);
typedef int (*cryo_fn_name)(int, const char **);
typedef int (*cryo_fn_pid_pi)(int, int *);
typedef int (*cryo_fn_pid_pv)(int, void *);
typedef int (*cryo_fn_dev_get)(int *, int);
typedef int (*cryo_fn_dev_name)(char *, int, int);
typedef int (*cryo_fn_dev_uuid)(void *, int);
typedef int (*cryo_fn_dev_mem)(size_t *, int);

static int cryo_call_u(void *f, unsigned int a) { return ((cryo_fn_u)f)(a); }
static int cryo_call_pi(void *f, int *a) { return ((cryo_fn_pi)f)(a); }
static int cryo_call_name(void *f, int e, const char **s) { return ((cryo_fn_name)f)(e, s); }
static int cryo_call_pid_pi(void *f, int pid, int *out) { return ((cryo_fn_pid_pi)f)(pid, out); }
static int cryo_call_pid_pv(void *f, int pid, void *args) { return ((cryo_fn_pid_pv)f)(pid, args); }
static int cryo_call_dev_get(void *f, int *d, int i) { return ((cryo_fn_dev_get)f)(d, i); }
static int cryo_call_dev_name(void *f, char *n, int l, int d) { return ((cryo_fn_dev_name)f)(n, l, d); }
static int cryo_call_dev_uuid(void *f, void *u, int d) { return ((cryo_fn_dev_uuid)f)(u, d); }
static int cryo_call_dev_mem(void *f, size_t *b, int d) { return ((cryo_fn_dev_mem)f)(b, d); }
*/
import "C"

import (
	"fmt"
	"math"
	"runtime"
	"time"
	"unsafe"

	"github.com/cryo-hpc/cryo/offload"
)

// DefaultLibrary is the library Open loads when no path is given.
const DefaultLibrary = "libcuda.so.1"

// symbols cryo looks up; those after cuGetErrorName may be missing (an old
// driver) and then the features that need them are unavailable.
var symbols = []string{
	"cuInit", "cuDriverGetVersion", "cuGetErrorName",
	"cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
	"cuCheckpointProcessRestore", "cuCheckpointProcessUnlock", "cuCheckpointProcessGetRestoreThreadId",
	"cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetName", "cuDeviceGetUuid_v2", "cuDeviceGetUuid", "cuDeviceTotalMem_v2",
}

var checkpointSymbols = []string{
	"cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
	"cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
}

// Lib is the CUDA driver library, loaded in-process with dlopen (never
// closed: the driver does not support being unloaded). Its methods call the
// driver's checkpoint API on a target process and are safe for concurrent
// use; each blocks until the driver answers.
type Lib struct {
	path    string
	syms    map[string]unsafe.Pointer
	version int
	initErr error // what cuInit(0) said; nil when the driver is usable
}

// Open loads the CUDA driver from path (DefaultLibrary when empty), reads
// its version and initialises it. It fails with ErrNoLibrary when the
// library cannot be loaded. A driver that loads but cannot initialise (no
// GPU) is returned with APIError saying so.
func Open(path string) (*Lib, error) {
	if path == "" {
		path = DefaultLibrary
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	runtime.LockOSThread() // dlerror is per thread
	h := C.cryo_dlopen(cpath)
	var dlerr string
	if h == nil {
		dlerr = C.GoString(C.cryo_dlerror())
	}
	runtime.UnlockOSThread()
	if h == nil {
		return nil, fmt.Errorf("%w: %s", ErrNoLibrary, dlerr)
	}
	l := &Lib{path: path, syms: map[string]unsafe.Pointer{}}
	for _, s := range symbols {
		cs := C.CString(s)
		if p := C.dlsym(h, cs); p != nil {
			l.syms[s] = p
		}
		C.free(unsafe.Pointer(cs))
	}
	for _, s := range symbols[:3] {
		if l.syms[s] == nil {
			return nil, fmt.Errorf("%w: %s has no %s: not a CUDA driver", ErrNoLibrary, path, s)
		}
	}
	var v C.int
	if r := C.cryo_call_pi(l.syms["cuDriverGetVersion"], &v); r != 0 {
		return nil, l.err("init", "cuDriverGetVersion", 0, int(r))
	}
	l.version = int(v)
	if r := C.cryo_call_u(l.syms["cuInit"], 0); r != 0 {
		l.initErr = l.err("init", "cuInit", 0, int(r))
	}
	return l, nil
}

// Path is the library that was loaded.
func (l *Lib) Path() string { return l.path }

// Version is the driver API version (cuDriverGetVersion: 12080 is 12.8).
func (l *Lib) Version() int { return l.version }

// Layout is the restore-args layout this driver expects.
func (l *Lib) Layout() Layout { return LayoutFor(l.version) }

// APIError says why the checkpoint API cannot be used here, or nil.
func (l *Lib) APIError() error {
	if l.version < MinCheckpointVersion {
		return fmt.Errorf("%w: driver API %s; checkpointing CUDA processes needs CUDA %s (driver r570) or newer",
			ErrNoCheckpointAPI, VersionString(l.version), VersionString(MinCheckpointVersion))
	}
	for _, s := range checkpointSymbols {
		if l.syms[s] == nil {
			return fmt.Errorf("%w: %s has no %s", ErrNoCheckpointAPI, l.path, s)
		}
	}
	if l.initErr != nil {
		return fmt.Errorf("%w: %w", ErrNoCheckpointAPI, l.initErr)
	}
	return nil
}

// RemapError says why this driver cannot restore onto other GPUs, or nil.
func (l *Lib) RemapError() error {
	if err := l.APIError(); err != nil {
		return err
	}
	if l.Layout() != LayoutGPUPairs {
		return fmt.Errorf("%w: the CUDA driver here is %s; restoring onto other GPUs needs CUDA %s (driver r580) or newer",
			offload.ErrRemapUnsupported, VersionString(l.version), VersionString(MinRemapVersion))
	}
	return nil
}

// errorName asks the driver for a CUresult's name.
func (l *Lib) errorName(code int) string {
	var s *C.char
	if f := l.syms["cuGetErrorName"]; f != nil && C.cryo_call_name(f, C.int(code), &s) == 0 && s != nil {
		return C.GoString(s)
	}
	if n, ok := fallbackNames[code]; ok {
		return n
	}
	return fmt.Sprintf("CUresult %d", code)
}

func (l *Lib) err(phase, fn string, pid, code int) error {
	return &Error{Phase: phase, Func: fn, PID: pid, Code: code, Name: l.errorName(code)}
}

func (l *Lib) sym(phase, name string) (unsafe.Pointer, error) {
	if err := l.APIError(); err != nil {
		return nil, err
	}
	f := l.syms[name]
	if f == nil {
		return nil, fmt.Errorf("%w: %s has no %s", ErrNoCheckpointAPI, l.path, name)
	}
	return f, nil
}

// State returns the checkpoint state of pid's CUDA process. A process that
// is not a CUDA process gives an error matching offload.ErrNoContext.
func (l *Lib) State(pid int) (offload.State, error) {
	f, err := l.sym("state", "cuCheckpointProcessGetState")
	if err != nil {
		return 0, err
	}
	var st C.int
	if r := C.cryo_call_pid_pi(f, C.int(pid), &st); r != 0 {
		return 0, l.err("state", "cuCheckpointProcessGetState", pid, int(r))
	}
	return offload.State(st), nil
}

// RestoreThreadID returns the tid of pid's CUDA restore thread.
func (l *Lib) RestoreThreadID(pid int) (int, error) {
	f := l.syms["cuCheckpointProcessGetRestoreThreadId"]
	if f == nil || l.APIError() != nil {
		return 0, fmt.Errorf("%w: no cuCheckpointProcessGetRestoreThreadId", ErrNoCheckpointAPI)
	}
	var tid C.int
	if r := C.cryo_call_pid_pi(f, C.int(pid), &tid); r != 0 {
		return 0, l.err("restore-thread", "cuCheckpointProcessGetRestoreThreadId", pid, int(r))
	}
	return int(tid), nil
}

// withArgs calls f(pid, args) with a 64-byte argument struct in C memory.
func (l *Lib) withArgs(phase, name string, pid int, args [ArgsSize]byte) error {
	f, err := l.sym(phase, name)
	if err != nil {
		return err
	}
	p := C.calloc(1, ArgsSize)
	if p == nil {
		return fmt.Errorf("cuda %s of pid %d: out of memory", phase, pid)
	}
	defer C.free(p)
	copy(unsafe.Slice((*byte)(p), ArgsSize), args[:])
	if r := C.cryo_call_pid_pv(f, C.int(pid), p); r != 0 {
		return l.err(phase, name, pid, int(r))
	}
	return nil
}

// Lock locks pid's CUDA process: new CUDA calls block, work in flight
// drains. It waits at most timeout (0: as long as it takes); on timeout the
// process stays running and the error matches offload.ErrLockTimeout.
func (l *Lib) Lock(pid int, timeout time.Duration) error {
	ms := uint32(0)
	if timeout > 0 {
		v := (timeout + time.Millisecond - 1) / time.Millisecond
		ms = uint32(min(int64(v), math.MaxUint32))
	}
	return l.withArgs("lock", "cuCheckpointProcessLock", pid, encodeLockArgs(ms))
}

// Checkpoint moves a locked process's device memory into its host memory
// and releases its GPUs.
func (l *Lib) Checkpoint(pid int) error {
	return l.withArgs("checkpoint", "cuCheckpointProcessCheckpoint", pid, [ArgsSize]byte{})
}

// Restore brings a checkpointed process's device memory back onto GPUs,
// remapped by pairs (none: the same GPUs). With pairs, every GPU the
// process had must be named.
func (l *Lib) Restore(pid int, pairs []Pair) error {
	f, err := l.sym("restore", "cuCheckpointProcessRestore")
	if err != nil {
		return err
	}
	var mem unsafe.Pointer
	if len(pairs) > 0 {
		if l.Layout() != LayoutGPUPairs {
			return l.RemapError()
		}
		b := encodePairs(pairs)
		mem = C.calloc(C.size_t(len(pairs)), PairSize)
		if mem == nil {
			return fmt.Errorf("cuda restore of pid %d: out of memory", pid)
		}
		defer C.free(mem)
		copy(unsafe.Slice((*byte)(mem), len(b)), b)
	}
	args, err := encodeRestoreArgs(l.Layout(), uintptr(mem), len(pairs))
	if err != nil {
		return err
	}
	p := C.calloc(1, ArgsSize)
	if p == nil {
		return fmt.Errorf("cuda restore of pid %d: out of memory", pid)
	}
	defer C.free(p)
	copy(unsafe.Slice((*byte)(p), ArgsSize), args[:])
	if r := C.cryo_call_pid_pv(f, C.int(pid), p); r != 0 {
		return l.err("restore", "cuCheckpointProcessRestore", pid, int(r))
	}
	return nil
}

// Unlock lets a locked process's CUDA calls run again.
func (l *Lib) Unlock(pid int) error {
	return l.withArgs("unlock", "cuCheckpointProcessUnlock", pid, [ArgsSize]byte{})
}

// DeviceInfo is a GPU as the CUDA driver sees it.
type DeviceInfo struct {
	Index  int    `json:"index"`
	UUID   string `json:"uuid"`
	Model  string `json:"model"`
	Memory uint64 `json:"memory_total"`
}

// Devices lists the GPUs the driver sees (without NVML: no free memory, no
// processes).
func (l *Lib) Devices() ([]DeviceInfo, error) {
	if l.initErr != nil {
		return nil, l.initErr
	}
	count, get, name, mem := l.syms["cuDeviceGetCount"], l.syms["cuDeviceGet"], l.syms["cuDeviceGetName"], l.syms["cuDeviceTotalMem_v2"]
	uuid := l.syms["cuDeviceGetUuid_v2"]
	if uuid == nil {
		uuid = l.syms["cuDeviceGetUuid"]
	}
	if count == nil || get == nil || name == nil || mem == nil || uuid == nil {
		return nil, fmt.Errorf("%s lacks the device query functions", l.path)
	}
	var n C.int
	if r := C.cryo_call_pi(count, &n); r != 0 {
		return nil, l.err("devices", "cuDeviceGetCount", 0, int(r))
	}
	var out []DeviceInfo
	for i := 0; i < int(n); i++ {
		var dev C.int
		if r := C.cryo_call_dev_get(get, &dev, C.int(i)); r != 0 {
			return nil, l.err("devices", "cuDeviceGet", 0, int(r))
		}
		nameBuf := (*C.char)(C.calloc(256, 1))
		r := C.cryo_call_dev_name(name, nameBuf, 256, dev)
		model := C.GoString(nameBuf)
		C.free(unsafe.Pointer(nameBuf))
		if r != 0 {
			return nil, l.err("devices", "cuDeviceGetName", 0, int(r))
		}
		u := C.calloc(1, 16)
		r = C.cryo_call_dev_uuid(uuid, u, dev)
		var id UUID
		copy(id[:], unsafe.Slice((*byte)(u), 16))
		C.free(u)
		if r != 0 {
			return nil, l.err("devices", "cuDeviceGetUuid", 0, int(r))
		}
		var bytes C.size_t
		if r := C.cryo_call_dev_mem(mem, &bytes, dev); r != 0 {
			return nil, l.err("devices", "cuDeviceTotalMem", 0, int(r))
		}
		out = append(out, DeviceInfo{Index: i, UUID: id.String(), Model: model, Memory: uint64(bytes)})
	}
	return out, nil
}
