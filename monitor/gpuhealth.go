package monitor

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/cryo-hpc/cryo/offload/nvml"
)

// Xids that NVML reports as critical but that are the application's own
// fault (a bad kernel, an MMU fault of its own, its contexts being torn
// down): the GPU stays healthy, so they are not device failures. The same
// list NVIDIA's Kubernetes device plugin skips.
var applicationXids = map[uint64]bool{13: true, 31: true, 43: true, 45: true, 68: true, 109: true}

// GPUHealth turns NVML's Xid events into failures of the jobs whose
// processes hold contexts on the GPU that reported them.
type GPUHealth struct {
	holders func(pids []int) (map[int][]nvml.Use, error)

	mu     sync.Mutex
	recent []nvml.XidEvent
}

// WatchGPUs starts watching lib's Xid events until ctx ends (a node whose
// GPUs report none logs so and never fails a job for its GPUs).
func WatchGPUs(ctx context.Context, lib *nvml.Lib, log *slog.Logger) *GPUHealth {
	h := &GPUHealth{holders: lib.Holders}
	go func() {
		err := lib.WatchXid(ctx, h.add)
		if err != nil && ctx.Err() == nil && log != nil {
			log.Warn("no GPU health events", "err", err)
		}
	}()
	return h
}

func (h *GPUHealth) add(e nvml.XidEvent) {
	if applicationXids[e.Xid] {
		return
	}
	h.mu.Lock()
	h.recent = append(h.recent, e)
	h.mu.Unlock()
}

// Critical implements HealthSource: the Xid events since the last call on
// GPUs where one of pids holds a context. Events on other GPUs are
// dropped: they are other jobs' trouble.
func (h *GPUHealth) Critical(pids []int) []string {
	h.mu.Lock()
	evs := h.recent
	h.recent = nil
	h.mu.Unlock()
	if len(evs) == 0 {
		return nil
	}
	uses, err := h.holders(pids)
	if err != nil {
		// A GPU that fell off the bus may take NVML with it: better to
		// restore on a device error we cannot place than to ignore it.
		var out []string
		for _, e := range evs {
			out = append(out, fmt.Sprintf("Xid %d on GPU %d (%s), and NVML cannot say which processes it hit: %v", e.Xid, e.Index, e.UUID, err))
		}
		return out
	}
	ours := map[string]bool{}
	for _, us := range uses {
		for _, u := range us {
			ours[u.GPU.UUID] = true
		}
	}
	var out []string
	for _, e := range evs {
		if ours[e.UUID] {
			out = append(out, fmt.Sprintf("Xid %d on GPU %d (%s)", e.Xid, e.Index, e.UUID))
		}
	}
	return out
}
