package cuda

import (
	"errors"

	"github.com/cryo-hpc/cryo/offload/nvml"
)

// Status is what this node offers for checkpointing CUDA jobs, for people
// (`cryo gpus`).
type Status struct {
	// NVML reports whether NVML is usable; NVMLProblem says why not.
	NVML          bool   `json:"nvml"`
	NVMLProblem   string `json:"nvml_problem,omitempty"`
	DriverVersion string `json:"driver_version,omitempty"`
	// CUDA reports whether the CUDA driver library loaded.
	CUDA              bool   `json:"libcuda"`
	CUDAProblem       string `json:"libcuda_problem,omitempty"`
	CUDAVersion       string `json:"cuda_version,omitempty"`
	CheckpointAPI     bool   `json:"checkpoint_api"`
	CheckpointProblem string `json:"checkpoint_api_problem,omitempty"`
	RestoreLayout     string `json:"restore_args_layout,omitempty"`
	GPURemap          bool   `json:"gpu_remap"`
	// GPUsFrom says where the GPU list comes from: "nvml", "cuda" (no
	// processes, no free memory) or "" (no driver: no GPUs).
	GPUsFrom string      `json:"gpus_from,omitempty"`
	GPUs     []StatusGPU `json:"gpus"`
}

// StatusGPU is one GPU.
type StatusGPU struct {
	Index       int          `json:"index"`
	UUID        string       `json:"uuid"`
	Model       string       `json:"model"`
	MemoryTotal uint64       `json:"memory_total"`
	MemoryUsed  *uint64      `json:"memory_used,omitempty"`
	Persistence *bool        `json:"persistence_mode,omitempty"`
	Processes   []StatusProc `json:"processes,omitempty"`
}

// StatusProc is a process with a CUDA context on a GPU.
type StatusProc struct {
	PID    int    `json:"pid"`
	Memory uint64 `json:"memory_used"`
	// State is its checkpoint state ("running", "locked", ...), when the
	// checkpoint API can tell.
	State string `json:"state,omitempty"`
}

// HasDriver reports whether any NVIDIA driver component is usable.
func (s Status) HasDriver() bool { return s.NVML || s.CUDA }

// Status describes the node's NVIDIA driver, GPUs and the processes on them.
func (d *Driver) Status() Status {
	var s Status
	s.GPUs = []StatusGPU{}
	a, aerr := d.api()
	if aerr != nil {
		s.CUDAProblem = aerr.Error()
	} else {
		s.CUDA = true
		s.CUDAVersion = VersionString(a.Version())
		s.RestoreLayout = a.Layout().String()
		if err := a.APIError(); err != nil {
			s.CheckpointProblem = err.Error()
		} else {
			s.CheckpointAPI = true
			s.GPURemap = a.RemapError() == nil
		}
	}
	nv, nerr := d.gpus()
	var info nvml.Info
	if nv != nil {
		info, nerr = nv.Info()
	}
	if nerr != nil {
		s.NVMLProblem = nerr.Error()
		if !errors.Is(nerr, nvml.ErrNoNVML) {
			s.NVMLProblem = "NVML: " + s.NVMLProblem
		}
	} else {
		s.NVML = true
		s.DriverVersion = info.DriverVersion
		s.GPUsFrom = "nvml"
		for _, g := range info.GPUs {
			used, persist := g.MemoryUsed, g.Persistence
			sg := StatusGPU{Index: g.Index, UUID: g.UUID, Model: g.Model, MemoryTotal: g.MemoryTotal, MemoryUsed: &used, Persistence: &persist}
			for _, p := range g.Processes {
				sp := StatusProc{PID: p.PID, Memory: p.Memory}
				if s.CheckpointAPI {
					if st, err := a.State(p.PID); err == nil {
						sp.State = st.String()
					}
				}
				sg.Processes = append(sg.Processes, sp)
			}
			s.GPUs = append(s.GPUs, sg)
		}
		return s
	}
	if s.CUDA {
		if devs, err := a.Devices(); err == nil {
			s.GPUsFrom = "cuda"
			for _, g := range devs {
				s.GPUs = append(s.GPUs, StatusGPU{Index: g.Index, UUID: g.UUID, Model: g.Model, MemoryTotal: g.Memory})
			}
		}
	}
	return s
}
