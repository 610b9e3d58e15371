package monitor

import (
	"errors"
	"strings"
	"testing"

	"github.com/cryo-hpc/cryo/offload/nvml"
)

func TestGPUHealthFailsOnlyJobsOnTheGPU(t *testing.T) {
	h := &GPUHealth{holders: func(pids []int) (map[int][]nvml.Use, error) {
		out := map[int][]nvml.Use{}
		for _, p := range pids {
			if p == 42 {
				out[p] = []nvml.Use{{GPU: nvml.GPU{UUID: "GPU-a"}}}
			}
		}
		return out, nil
	}}
	h.add(nvml.XidEvent{Index: 1, UUID: "GPU-b", Xid: 79}) // another job's GPU
	h.add(nvml.XidEvent{Index: 0, UUID: "GPU-a", Xid: 13}) // the application's own fault
	if got := h.Critical([]int{42}); len(got) != 0 {
		t.Fatalf("failed the job for %q", got)
	}
	h.add(nvml.XidEvent{Index: 0, UUID: "GPU-a", Xid: 79})
	got := h.Critical([]int{42, 43})
	if len(got) != 1 || !strings.Contains(got[0], "Xid 79 on GPU 0 (GPU-a)") {
		t.Fatalf("Critical = %q, want the Xid 79 on GPU-a", got)
	}
	if got := h.Critical([]int{42}); len(got) != 0 {
		t.Errorf("an event was reported twice: %q", got)
	}
	// NVML itself failing: report rather than ignore.
	h.holders = func([]int) (map[int][]nvml.Use, error) { return nil, errors.New("GPU is lost") }
	h.add(nvml.XidEvent{Index: 0, UUID: "GPU-a", Xid: 79})
	if got := h.Critical([]int{42}); len(got) != 1 {
		t.Errorf("an Xid with NVML unavailable was dropped")
	}
}
