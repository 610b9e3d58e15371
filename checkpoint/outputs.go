package checkpoint

import (
	"os"
	"path/filepath"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// scanOutputs lists the files the job holds open for writing, before the
// dump (see outputs.Record for why before).
func scanOutputs(o Options) map[string]outputs.Open {
	t, err := proc.All()
	if err != nil {
		return nil
	}
	return outputs.Scan(proc.Descendants(t, append([]int{o.PID}, o.MorePIDs...)...))
}

// outputsSpec records the job's output files with their sizes at the
// freeze, as outputs.json in the generation (a "log" file: it is not
// given to CRIU), so that a restore can cut them back
// (restore.Options.TruncateOutputs). A job without output files, or
// images that cannot be read, get no record: nothing will be cut.
func outputsSpec(scan map[string]outputs.Open, images, work string, trees []string) []store.FileSpec {
	if len(scan) == 0 {
		return nil
	}
	dirs := []string{images}
	if len(trees) > 0 {
		dirs = nil
		for _, t := range trees {
			dirs = append(dirs, filepath.Join(images, t))
		}
	}
	var regs []criu.RegFile
	for _, d := range dirs {
		rs, err := criu.ReadRegFiles(d)
		if err != nil {
			return nil
		}
		regs = append(regs, rs...)
	}
	rec := outputs.Record(scan, regs)
	if len(rec) == 0 {
		return nil
	}
	b, err := outputs.Encode(rec)
	if err != nil {
		return nil
	}
	p := filepath.Join(work, outputs.ImageName)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		return nil
	}
	return []store.FileSpec{{Path: p, Name: outputs.ImageName, Kind: "log"}}
}
