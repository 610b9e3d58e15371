// Package nvml tells cryo about the GPUs of a node through NVML (go-nvml):
// the driver and CUDA versions, each GPU (index, UUID, model, memory,
// persistence mode), which processes hold contexts on which GPUs and how
// much device memory, and Xid health events for the monitor.
//
// When libnvidia-ml cannot be loaded (every CPU node) Open fails with
// ErrNoNVML, and callers treat the node as having no GPUs: that is not an
// error. NVML is reached only through go-nvml's Interface, so tests use
// go-nvml's own mocks (pkg/nvml/mock, mock/dgxa100).
//
// It only reads: it never changes a GPU's settings.
package nvml
