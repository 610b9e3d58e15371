package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/store"
)

// ImportOptions are the choices for Import.
type ImportOptions struct {
	Store string // created if missing
	// Images is a directory of complete CRIU images of one tree (pages
	// included), with outputs.json when the job had output files open.
	Images string
	// Manifest describes the job (Hold's); its files are filled in here.
	Manifest *store.Manifest
	// PackSize bounds the packs written (0: the store's default).
	PackSize int64
	LockWait time.Duration
	Progress *store.Progress
}

// Import commits a directory of CRIU images that another cryo dumped (a
// job migrated here) as a new generation of o.Store, so that it is
// restored, verified and kept like any checkpoint. Nothing is committed on
// failure.
func Import(ctx context.Context, o ImportOptions) (*Result, error) {
	start := time.Now()
	if o.Manifest == nil || len(o.Manifest.Job.Processes) == 0 {
		return nil, errors.New("import: a manifest with the job's processes is needed")
	}
	st, unlock, err := writeStore(ctx, o.Store, o.LockWait)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st.Progress, st.PackLimit = o.Progress, o.PackSize
	if _, err := st.CleanStaging(); err != nil {
		return nil, fmt.Errorf("clean staging: %w", err)
	}
	specs, err := fileSpecs(o.Images, o.Images)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", o.Images, err)
	}
	for i := range specs {
		if specs[i].Name == outputs.ImageName || specs[i].Name == "dump.log" {
			specs[i].Kind = "log" // not CRIU's: kept with the generation, not given to CRIU
		}
	}
	w, err := st.NewWriterOpts(store.WriterOptions{})
	if err != nil {
		return nil, err
	}
	w.Release()
	if err := w.AddFiles(ctx, specs); err != nil {
		return nil, errors.Join(fmt.Errorf("store images: %w", err), w.Abort())
	}
	m := *o.Manifest
	m.Files = nil
	m.Stats.DurableMS = time.Since(start).Milliseconds()
	gen, err := w.Commit(&m)
	if err != nil {
		return nil, errors.Join(err, w.Abort())
	}
	return &Result{Generation: gen, Store: st.Dir, Manifest: &m, Processes: len(m.Job.Processes),
		Durable: time.Since(start), RawBytes: m.Stats.RawBytes, NewBytes: m.Stats.NewBytes}, nil
}
