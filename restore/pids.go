package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// ErrPIDInUse means a PID the job needs is held by another process.
var ErrPIDInUse = errors.New("pid in use")

// PIDError says which number the restored job needs and who holds it. It
// matches ErrPIDInUse.
type PIDError struct {
	ID     int         // the PID or thread ID the job needs
	Comm   string      // the checkpointed process that needs it
	Holder proc.Holder // who holds it
	// Live is set when a live process holds it, which waiting will not
	// change; otherwise a dying process (a zombie, or one being killed)
	// still held it after the wait.
	Live bool
	Wait time.Duration
}

func (e *PIDError) Error() string {
	h := e.Holder
	if !e.Live {
		return fmt.Sprintf("%v: %s, a dying process, and still is after %s", ErrPIDInUse, h, e.Wait)
	}
	if h.How == "pid" {
		return fmt.Sprintf("%v: pid %d, which the checkpointed %q needs, is held by a live process %q (is the job still running?)",
			ErrPIDInUse, e.ID, e.Comm, h.Comm)
	}
	return fmt.Sprintf("%v: pid %d, which the checkpointed %q needs, is taken: it is the %s of the live process %d (%q); "+
		"the number stays allocated while a member of the %s lives", ErrPIDInUse, e.ID, e.Comm, h.How, h.PID, h.Comm, h.How)
}

// Is makes a PIDError match ErrPIDInUse.
func (e *PIDError) Is(target error) bool { return target == ErrPIDInUse }

// pidsFree checks that every PID and thread ID of the job is free: no
// process or thread has it, and no process has it as its process group or
// session (see proc.Holders). It waits up to wait for numbers held only by
// dying processes (zombies, or processes with SIGKILL pending); a live
// holder is refused at once. It never signals anyone.
func pidsFree(ctx context.Context, m *store.Manifest, wait time.Duration, log *slog.Logger) error {
	need := map[int]string{}
	var ids []int
	for _, p := range m.Job.Processes {
		for _, id := range append([]int{p.PID}, p.TIDs...) {
			if _, ok := need[id]; !ok {
				need[id] = p.Comm
				ids = append(ids, id)
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		hs, err := proc.Holders(ids)
		if err != nil {
			return fmt.Errorf("check the job's PIDs are free: %w", err)
		}
		if len(hs) == 0 {
			return nil
		}
		for _, h := range hs {
			if !dying(h.PID) {
				return &PIDError{ID: h.ID, Comm: need[h.ID], Holder: h, Live: true}
			}
		}
		log.Debug("waiting for dying processes to release the job's pids", "first", hs[0].String())
		select {
		case <-ctx.Done():
			h := hs[0]
			return &PIDError{ID: h.ID, Comm: need[h.ID], Holder: h, Wait: wait}
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// dying reports whether pid is a zombie, dead, or has SIGKILL pending.
func dying(pid int) bool {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return true
	}
	if st.State == 'Z' || st.State == 'X' {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err == nil && mask&(1<<8) != 0 { // SIGKILL is signal 9: bit 8
			return true
		}
	}
	return false
}
