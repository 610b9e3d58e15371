package checkpoint

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

// replica is the second store a checkpoint copies its generation to
// (Options.Replica), held under its exclusive lock.
type replica struct {
	st     *store.Store
	unlock func()
}

// openReplica creates or opens the replica store, takes its lock and
// clears its staging. It returns nil and no error without a replica, and
// nil and the reason when the replica cannot be used.
func openReplica(ctx context.Context, o Options, wait time.Duration, log *slog.Logger) (*replica, error) {
	if o.Replica == "" {
		return nil, nil
	}
	fail := func(err error) (*replica, error) {
		err = fmt.Errorf("replica %s: %w", o.Replica, err)
		log.Warn("the replica cannot be used", "err", err)
		return nil, err
	}
	if a, b := absPath(o.Replica), absPath(o.Store); a == b || sameFile(a, b) {
		return fail(fmt.Errorf("it is the store itself"))
	}
	st, err := store.Create(o.Replica, "cryo "+Version)
	if err != nil {
		return fail(err)
	}
	st.PackLimit = o.PackSize
	unlock, err := st.LockWithin(ctx, true, wait)
	if err != nil {
		return fail(err)
	}
	if _, err := st.CleanStaging(); err != nil {
		unlock()
		return fail(fmt.Errorf("clean staging: %w", err))
	}
	return &replica{st: st, unlock: unlock}, nil
}

func (r *replica) store() *store.Store {
	if r == nil {
		return nil
	}
	return r.st
}

// finish records in res whether the replica got the generation, and applies
// the retention to the replica too.
func (r *replica) finish(res *Result, w *store.Writer, openErr error, o Options, log *slog.Logger) {
	switch {
	case o.Replica == "":
		return
	case r == nil:
		res.ReplicaError = openErr.Error()
		return
	}
	if err := w.ReplicaErr(); err != nil {
		res.ReplicaError = err.Error()
		log.Warn("generation committed without its replica copy", "generation", res.Generation, "err", err)
		return
	}
	res.Replica = r.st.Dir
	_, res.ReplicaBytes = w.ReplicaStats()
	if _, err := r.st.Retain(o.Keep); err != nil {
		log.Warn("replica retention", "replica", r.st.Dir, "err", err)
	}
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return filepath.Clean(p)
}

func sameFile(a, b string) bool {
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}
