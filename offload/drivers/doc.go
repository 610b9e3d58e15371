// Package drivers assembles cryo's default offload registry: every offload
// driver cryo has, configured from the environment (CRYO_LIBCUDA,
// CRYO_LIBNVML). It holds no state of its own; callers own the registry it
// returns.
package drivers
