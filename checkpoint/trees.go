package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/freezer"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// dumpJob runs CRIU on the job: one dump of the tree rooted at o.PID, or,
// with o.MorePIDs, a dump of each tree while all of them are frozen
// together, into images/tree-N. It returns the tree directories ("" for
// one tree). frozen, when set, is called once while the whole job is
// still frozen after its dump (CRIU's post-dump point); its error fails
// the dump and the job runs on. The writer is released (its workers may
// start) once CRIU lets the job go.
func dumpJob(ctx context.Context, bin criu.Binary, copts criu.Options, w *store.Writer, o Options, images, work string, frozen func() error, log *slog.Logger) ([]string, error) {
	if len(o.MorePIDs) == 0 {
		err := dumpTree(ctx, bin, copts, w, o, images, "", frozen)
		w.Release()
		return nil, err
	}
	roots := append([]int{o.PID}, o.MorePIDs...)
	var pids [][]int
	for _, r := range roots {
		ps, err := proc.Tree(r)
		if err != nil {
			return nil, err
		}
		pids = append(pids, ps)
	}
	grp, err := freezer.Freeze(strconv.Itoa(os.Getpid()), pids, 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf("freeze the job's %d trees: %w", len(roots), err)
	}
	log.Debug("trees frozen together", "trees", len(roots))
	var trees []string
	var errs []error
	for i, root := range roots {
		name := fmt.Sprintf("tree-%d", i)
		dir, wdir := filepath.Join(images, name), filepath.Join(work, name)
		if err := errors.Join(os.Mkdir(dir, 0o700), os.Mkdir(wdir, 0o700)); err != nil {
			errs = append(errs, err)
			break
		}
		to := copts
		to.ImagesDir, to.WorkDir, to.Pid = dir, wdir, root
		to.FreezeCgroup = grp.Cgroup(i) // already frozen: CRIU leaves it so
		if err := dumpTree(ctx, bin, to, w, o, dir, name+"/", nil); err != nil {
			errs = append(errs, fmt.Errorf("tree %d (pid %d): %w", i, root, err))
			break
		}
		trees = append(trees, name)
	}
	if len(errs) == 0 && frozen != nil {
		// Every tree is dumped and all are still frozen together.
		errs = append(errs, frozen())
	}
	// Every tree is dumped (or one failed): the job runs on (or, with
	// Kill, stays stopped by CRIU until the checkpoint is committed).
	errs = append(errs, grp.Thaw())
	w.Release()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return trees, nil
}

// dumpTree dumps one tree, its pages streamed to the writer (under prefix);
// frozen, when set, is called at CRIU's post-dump point, the tree still
// frozen.
func dumpTree(ctx context.Context, bin criu.Binary, copts criu.Options, w *store.Writer, o Options, images, prefix string, frozen func() error) error {
	var stream *pageStream
	if !o.NoStream {
		var err error
		if stream, err = startPageStream(w, bin.Version); err != nil {
			return err
		}
		stream.prefix = prefix
		copts.PageServer = &criu.PageServerAddr{File: stream.theirs}
	}
	var nfy criu.Notify
	if frozen != nil {
		nfy = func(script string, _ int32) error {
			if script == "post-dump" {
				return frozen()
			}
			return nil
		}
	}
	derr := criu.Dump(ctx, bin, copts, nfy)
	if stream != nil {
		if serr := stream.finish(images, derr); serr != nil && derr == nil {
			derr = serr
			if o.Kill {
				// CRIU left the tree stopped; it must go on.
				tasks, _ := criu.ReadTree(images)
				derr = errors.Join(derr, resume(o, tasks))
			}
		}
	}
	return derr
}

// readTrees lists the processes of every dumped tree.
func readTrees(images string, trees []string) ([]criu.Task, error) {
	if len(trees) == 0 {
		return criu.ReadTree(images)
	}
	var all []criu.Task
	for _, t := range trees {
		ts, err := criu.ReadTree(filepath.Join(images, t))
		if err != nil {
			return all, err
		}
		all = append(all, ts...)
	}
	return all, nil
}

// readStats reads CRIU's dump statistics; with several trees, the frozen
// time is from the first freeze to the last thaw as CRIU saw them, which
// the slowest tree bounds, so the largest of each figure is kept.
func readStats(work string, trees []string) (criu.DumpStats, error) {
	if len(trees) == 0 {
		return criu.ReadDumpStats(work)
	}
	var out criu.DumpStats
	for _, t := range trees {
		s, err := criu.ReadDumpStats(filepath.Join(work, t))
		if err != nil {
			return out, err
		}
		out.FreezingMS = max(out.FreezingMS, s.FreezingMS)
		out.FrozenMS += s.FrozenMS // the trees stood frozen while each was dumped in turn
		out.MemdumpMS += s.MemdumpMS
		out.MemwriteMS += s.MemwriteMS
		out.PagesScanned += s.PagesScanned
		out.PagesWritten += s.PagesWritten
	}
	return out, nil
}
