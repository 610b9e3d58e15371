package restore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/store"
)

// treeName is how checkpoint names the trees of a job without one root.
var treeName = regexp.MustCompile(`^tree-[0-9]{1,6}$`)

// restoreTrees restores a job that was dumped as several trees, all at
// once: each tree's CRIU holds at its post-restore point (the tree is
// back, still stopped, its TCP connections still locked) until every tree
// has got there, so that none runs — or sends into a connection whose
// other end is not back yet — before all are. If one tree fails, the
// others are abandoned too (CRIU kills what it restored). It returns the
// root PID of each tree.
func restoreTrees(ctx context.Context, bin criu.Binary, base criu.Options, images, work string, trees []string) ([]int, error) {
	for _, t := range trees {
		// A tree is a directory that checkpoint named: nothing else, and
		// nowhere outside the work directory ("../x" from a crafted store).
		if !treeName.MatchString(t) {
			return nil, fmt.Errorf("%w: the manifest names a tree %q (want tree-N)", store.ErrCorrupt, t)
		}
	}
	n := len(trees)
	var arrived sync.WaitGroup
	arrived.Add(n)
	release, failed := make(chan struct{}), make(chan struct{})
	var failOnce sync.Once
	go func() { arrived.Wait(); close(release) }()

	pids := make([]int, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, t := range trees {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := base
			o.ImagesDir, o.WorkDir = filepath.Join(images, t), filepath.Join(work, t)
			if err := os.MkdirAll(o.WorkDir, 0o700); err != nil {
				errs[i] = err
				arrived.Done()
				failOnce.Do(func() { close(failed) })
				return
			}
			reached := false
			pid, err := criu.Restore(ctx, bin, o, func(script string, _ int32) error {
				if script != "post-restore" {
					return nil
				}
				reached = true
				arrived.Done()
				select {
				case <-release:
					return nil
				case <-failed:
					return errors.New("another tree of the job did not restore")
				case <-time.After(2 * time.Minute):
					return errors.New("the other trees of the job took too long to restore")
				}
			})
			if err != nil {
				if !reached {
					arrived.Done()
				}
				failOnce.Do(func() { close(failed) })
				errs[i] = fmt.Errorf("tree %s: %w", t, err)
				return
			}
			pids[i] = pid
		}()
	}
	wg.Wait()
	return pids, errors.Join(errs...)
}
