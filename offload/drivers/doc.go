// Package drivers assembles cryo's offload registry: every offload driver
// cryo has, configured from the environment (CRYO_LIBCUDA, CRYO_LIBNVML).
//
// Open is the lifecycle: a process (one cryo command, one supervisor)
// opens the registry once, so that libcuda is loaded and NVML initialised
// once, passes it to every checkpoint, restore and recovery, and closes it
// at the end (nvmlShutdown). A kind whose libraries the node lacks gets a
// null driver that finds no contexts and says why it cannot restore
// recorded ones, so callers never check for NVML themselves. Status and
// NVML give `cryo gpus` and GPU health what the opened driver knows.
//
// It holds no state of its own; callers own the registry it returns.
package drivers
