package checkpoint

import (
	"errors"
	"fmt"

	"github.com/cryo-hpc/cryo/internal/store"
)

// ErrRefused means Options.Accept refused a dumped generation: nothing was
// committed and retention did not run.
var ErrRefused = errors.New("the checkpoint was refused")

// Dumped is what a generation about to be committed holds, for
// Options.Accept.
type Dumped struct {
	RootPID   int
	Processes []store.Process
}

// accept asks o.Accept, if set, whether the generation described by m may
// be committed.
func accept(o Options, m *store.Manifest) error {
	if o.Accept == nil {
		return nil
	}
	if err := o.Accept(Dumped{RootPID: m.Job.RootPID, Processes: m.Job.Processes}); err != nil {
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	return nil
}
