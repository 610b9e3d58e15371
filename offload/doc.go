// Package offload owns a job's offload contexts: device-side state that CRIU
// cannot see (a CUDA context on a GPU; later, a coprocessor offload process
// linked to the host by channels) and must be pulled into host memory
// before CRIU dumps the job.
//
// It defines the Context interface every kind of offload context meets —
// lock with a timeout, checkpoint, restore with a device map, unlock, state
// — the Driver interface that finds a job's contexts and re-attaches to
// recorded ones, and a Registry of drivers. On top of those it orchestrates
// (Quiesce, Group): lock all contexts of a job in parallel, then checkpoint
// them in parallel, and undo in reverse when anything fails, so a job is
// never left locked. Each state change is written first to an intent
// journal in the store's staging area; Recover reads journals that a killed
// cryo left behind and puts their contexts back to the state they had.
//
// The device-map logic (ParseDeviceMap, Plan) is pure: it decides where
// recorded contexts go on the GPUs of the restoring node, honouring a user
// map, and says clearly when no valid mapping exists.
//
// Drivers live in subpackages (offload/cuda, with offload/nvml for GPU
// discovery and health); offload/drivers opens the registry, once per
// process, and Registry.Close releases what its drivers hold. This
// package must not print, must not know CRIU, and must not import its
// drivers.
package offload
