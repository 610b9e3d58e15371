package cuda

import (
	"errors"
	"fmt"

	"github.com/cryo-hpc/cryo/offload"
)

// CUresult values cryo branches on.
const (
	Success          = 0
	ErrInvalidValue  = 1
	ErrOutOfMemory   = 2
	ErrNotInit       = 3
	ErrNoDevice      = 100
	ErrInvalidDevice = 101
	ErrIllegalState  = 401
	ErrNotFound      = 500
	ErrNotSupported  = 801
	ErrTimeout       = 909
)

var (
	// ErrNoLibrary means libcuda.so.1 cannot be loaded: no NVIDIA driver.
	ErrNoLibrary = fmt.Errorf("%w: libcuda.so.1 cannot be loaded", offload.ErrNoDriver)
	// ErrNoCheckpointAPI means the driver has no usable checkpoint API.
	ErrNoCheckpointAPI = fmt.Errorf("%w: the CUDA driver has no checkpoint API", offload.ErrNoDriver)

	errNoAPI = ErrNoCheckpointAPI
	errRemap = offload.ErrRemapUnsupported
)

// Error is a failed CUDA driver call: the phase cryo was in, the function,
// the target process and the CUDA error, by name.
type Error struct {
	Phase string // "lock", "checkpoint", "restore", "unlock", "state", "init"
	Func  string // e.g. "cuCheckpointProcessLock"
	PID   int    // 0 when the call has no target process
	Code  int    // the CUresult
	Name  string // e.g. "CUDA_ERROR_TIMEOUT"
}

func (e *Error) Error() string {
	s := fmt.Sprintf("cuda %s", e.Phase)
	if e.PID > 0 {
		s += fmt.Sprintf(" of pid %d", e.PID)
	}
	return s + fmt.Sprintf(": %s returned %s (%d)", e.Func, e.Name, e.Code)
}

// Is lets callers branch on what the CUDA error means for them.
func (e *Error) Is(target error) bool {
	switch target {
	case offload.ErrLockTimeout:
		return e.Code == ErrTimeout && e.Phase == "lock"
	case offload.ErrNoContext:
		return e.Code == ErrNotFound
	case offload.ErrNoMapping:
		return e.Phase == "restore" && (e.Code == ErrInvalidDevice || e.Code == ErrOutOfMemory)
	}
	return false
}

// IsCode reports whether err is a CUDA error with this CUresult.
func IsCode(err error, code int) bool {
	var ce *Error
	return errors.As(err, &ce) && ce.Code == code
}

// fallbackNames names the CUresults the checkpoint API returns, for a
// driver whose cuGetErrorName does not know one.
var fallbackNames = map[int]string{
	0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
	3: "CUDA_ERROR_NOT_INITIALIZED", 4: "CUDA_ERROR_DEINITIALIZED", 46: "CUDA_ERROR_DEVICE_UNAVAILABLE",
	100: "CUDA_ERROR_NO_DEVICE", 101: "CUDA_ERROR_INVALID_DEVICE", 304: "CUDA_ERROR_OPERATING_SYSTEM",
	401: "CUDA_ERROR_ILLEGAL_STATE", 500: "CUDA_ERROR_NOT_FOUND", 600: "CUDA_ERROR_NOT_READY",
	800: "CUDA_ERROR_NOT_PERMITTED", 801: "CUDA_ERROR_NOT_SUPPORTED", 909: "CUDA_ERROR_TIMEOUT",
	999: "CUDA_ERROR_UNKNOWN",
}
