package slurm

import (
	"strings"
	"syscall"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// BatchShellDrops reports whether pid is a Slurm batch script (slurmd runs
// it as .../job<ID>/slurm_script) whose shell neither catches nor ignores
// sig. A `--signal=B:` signal goes to that shell only; without a trap it
// dies of it and the job ends, whatever cryo would have done.
func BatchShellDrops(pid int, sig syscall.Signal) bool {
	argv, err := proc.Cmdline(pid)
	if err != nil {
		return false
	}
	batch := false
	for _, a := range argv {
		if strings.HasSuffix(a, "/slurm_script") {
			batch = true
		}
	}
	if !batch {
		return false
	}
	handled, err := proc.SignalsHandled(pid)
	if err != nil {
		return false
	}
	return handled&(1<<(uint(sig)-1)) == 0
}
