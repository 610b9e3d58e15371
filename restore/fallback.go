package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

// Skip is a damaged generation that a fallback restore passed over.
type Skip struct {
	Generation int    `json:"generation"`
	Reason     string `json:"reason"`
}

func (s Skip) String() string { return fmt.Sprintf("generation %d: %s", s.Generation, s.Reason) }

// restoreFallback restores o.Generation (0: the newest) or, when that is
// damaged and cannot be healed, the newest older generation that restores.
// Only damage (ErrCorrupt) moves on to an older generation: any other
// failure (a PID in use, CRIU refusing) is returned at once, since an older
// generation would meet it too. It is the one implementation of fallback
// for the CLI (--fallback) and the library (cryo.Restore).
func restoreFallback(ctx context.Context, o Options) (*Result, error) {
	st, err := store.Open(o.Store)
	if err != nil {
		return nil, err
	}
	gens, err := st.Generations()
	if err != nil {
		return nil, err
	}
	if len(gens) == 0 {
		return nil, fmt.Errorf("%w: store %s has no checkpoints yet", store.ErrNoGeneration, st.Dir)
	}
	var candidates []int
	for i := len(gens) - 1; i >= 0; i-- {
		if o.Generation == 0 || gens[i] <= o.Generation {
			candidates = append(candidates, gens[i])
		}
	}
	if o.Generation != 0 && (len(candidates) == 0 || candidates[0] != o.Generation) {
		return nil, fmt.Errorf("%w: %d in %s", store.ErrNoGeneration, o.Generation, st.Dir)
	}
	var skipped []Skip
	var errs []error
	for _, g := range candidates {
		one := o
		one.Fallback, one.Generation = false, g
		res, err := Restore(ctx, one)
		if err == nil {
			res.Skipped = skipped
			return res, nil
		}
		if !errors.Is(err, store.ErrCorrupt) {
			if len(skipped) > 0 {
				return nil, fmt.Errorf("restore generation %d (after passing over damaged %s): %w", g, skippedGens(skipped), err)
			}
			return nil, err
		}
		if o.Logger != nil {
			o.Logger.Info("generation is damaged; falling back to an older one", "generation", g, "err", err)
		}
		skipped = append(skipped, Skip{Generation: g, Reason: err.Error()})
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("no generation of %s restores: %w", st.Dir, errors.Join(errs...))
}

func skippedGens(s []Skip) string {
	out := ""
	for i, k := range s {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprint(k.Generation)
	}
	return out
}

// openReplica opens the replica store named by dir under its shared lock,
// for healing st. It returns nil (and logs why) when there is none or it
// cannot be used; the returned function releases the lock.
func openReplica(ctx context.Context, dir string, st *store.Store, wait time.Duration, log *slog.Logger) (*store.Store, func()) {
	if dir == "" {
		return nil, func() {}
	}
	rep, err := store.Open(dir)
	if err == nil && rep.Dir == st.Dir {
		err = errors.New("it is the store itself")
	}
	if err != nil {
		log.Warn("the replica cannot be used to heal the store", "replica", dir, "err", err)
		return nil, func() {}
	}
	lctx, cancel := context.WithTimeout(ctx, wait)
	unlock, err := rep.Lock(lctx, false)
	cancel()
	if err != nil {
		log.Warn("the replica cannot be used to heal the store", "replica", dir, "err", err)
		return nil, func() {}
	}
	return rep, unlock
}
