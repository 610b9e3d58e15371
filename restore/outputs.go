package restore

import (
	"fmt"

	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/store"
)

// maxOutputsRecord bounds the outputs record read from a store.
const maxOutputsRecord = 16 << 20

// cutOutputs, with Options.TruncateOutputs, cuts the files the job had
// open for writing at the checkpoint back to their sizes then (see
// internal/outputs), so that what the job wrote after the checkpoint, and
// writes again once restored, appears once. It runs when the job's old
// processes are gone and before CRIU restores it. A generation without a
// record (taken before cryo recorded outputs, or a job without output
// files) cuts nothing. Files that cannot be cut are named in the error;
// the restore goes on (CRIU refuses a file whose size it checks).
func (o Options) cutOutputs(m *store.Manifest, read imageReader) ([]outputs.Cut, error) {
	if !o.TruncateOutputs {
		return nil, nil
	}
	var size int64 = -1
	for _, f := range m.Files {
		if f.Name == outputs.ImageName {
			size = f.Size
		}
	}
	if size < 0 {
		return nil, nil
	}
	if size > maxOutputsRecord {
		return nil, fmt.Errorf("generation %d: %s is %d bytes, more than a record can be", m.Generation, outputs.ImageName, size)
	}
	b, err := read(outputs.ImageName, size)
	if err != nil {
		return nil, err
	}
	rec, err := outputs.Decode(b)
	if err != nil {
		return nil, err
	}
	return outputs.Truncate(rec)
}
