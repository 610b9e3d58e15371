// Package cuda is the offload driver for CUDA contexts. It talks to the
// CUDA driver in-process, without any external binary: libcuda.so.1 is
// loaded with dlopen (the path can be overridden, CRYO_LIBCUDA) and its
// checkpoint API is called on a target process: cuCheckpointProcessGetState,
// cuCheckpointProcessLock (with timeoutMs), cuCheckpointProcessCheckpoint,
// cuCheckpointProcessRestore (with GPU UUID pairs), cuCheckpointProcessUnlock
// and cuCheckpointProcessGetRestoreThreadId, plus cuInit,
// cuDriverGetVersion and cuGetErrorName.
//
// Supported drivers. The checkpoint API needs CUDA 12.8 (display driver
// r570) or newer; older drivers are reported as having no checkpoint API.
// The argument structs are 64 bytes whose reserved fields must be zero.
// CUcheckpointRestoreArgs changed shape between releases, so its layout is
// chosen from cuDriverGetVersion (see Layout):
//
//	CUDA 12.8-12.9 (r570, r575)  reserved[8]: restore onto the same GPUs only
//	CUDA 13.0 and newer (r580+)  gpuPairs at 0, gpuPairsCount at 8, the rest
//	                             reserved: restore onto other GPUs
//
// Remapping onto other GPUs on an older driver is refused before anything
// is changed. Only little-endian 64-bit hosts are supported (as by the
// driver's checkpoint API itself).
//
// Discovery uses NVML (offload/nvml): the job's processes that NVML lists
// on a GPU hold contexts, and their records name the GPUs (UUID, model,
// index) and device memory, for restore placement. Without NVML the node is
// treated as having no GPUs; if libcuda loads all the same, each process of
// the job is asked for its checkpoint state, and one that answers is a CUDA
// process (its GPUs unknown).
//
// Lifecycle: a Driver loads libcuda and initialises NVML once, at Open or
// at first use, and Close shuts NVML down (offload/drivers.Open and the
// registry's Close do both for a process).
//
// Errors (*Error) carry the CUDA error name, the target PID and the phase.
// Calls block until the driver answers; only the lock has a timeout.
//
// Tests run against a strict fake of the driver and of NVML built from C
// (testdata/fakecuda, see package cudatest); no GPU is needed.
package cuda
