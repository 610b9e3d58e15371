// Package freezer freezes several process trees at once with the cgroup v1
// freezer, so that trees that cannot share one root are cut at the same
// instant before CRIU dumps each of them. Each tree is moved into a
// freezer cgroup of its own (v1 hierarchies are independent: the memory,
// cpu and other cgroups of the job, a batch system's included, are not
// touched), frozen, and afterwards thawed and moved back where it was.
//
// The cgroup v2 freezer freezes a whole cgroup in place; moving a job
// between v2 cgroups would move it out of its resource limits, so this
// package refuses v2-only hosts rather than do that.
package freezer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Root is where the cgroup v1 freezer hierarchy is mounted.
var Root = "/sys/fs/cgroup/freezer"

// ErrNoFreezer means the host has no cgroup v1 freezer.
var ErrNoFreezer = errors.New("no cgroup v1 freezer")

// Available reports whether the v1 freezer is mounted.
func Available() error {
	if _, err := os.Stat(filepath.Join(Root, "freezer.state")); err == nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(Root, "tasks")); err == nil {
		return nil // the root cgroup has no freezer.state, but the hierarchy is there
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return fmt.Errorf("%w: this host has only cgroup v2, whose freezer works in place; give the trees one root instead (cryo run)", ErrNoFreezer)
	}
	return fmt.Errorf("%w at %s", ErrNoFreezer, Root)
}

// Group is a set of trees frozen together.
type Group struct {
	dirs   []string       // our cgroups, one per tree
	origin map[int]string // task -> the freezer cgroup it came from
}

// Freeze moves each tree (its PIDs, threads included) into a new freezer
// cgroup named after name, and freezes them all. On error everything is
// undone. Thaw undoes a successful Freeze.
func Freeze(name string, trees [][]int, timeout time.Duration) (_ *Group, err error) {
	if err := Available(); err != nil {
		return nil, err
	}
	g := &Group{origin: map[int]string{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, g.Thaw())
		}
	}()
	for i, pids := range trees {
		dir := filepath.Join(Root, "cryo", fmt.Sprintf("%s-%d", name, i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("freezer: %w", err)
		}
		g.dirs = append(g.dirs, dir)
		for _, pid := range pids {
			for _, tid := range tasks(pid) {
				if _, ok := g.origin[tid]; !ok {
					g.origin[tid] = current(tid)
				}
				if err := os.WriteFile(filepath.Join(dir, "tasks"), []byte(strconv.Itoa(tid)), 0o644); err != nil {
					return nil, fmt.Errorf("freezer: move task %d of pid %d: %w", tid, pid, err)
				}
			}
		}
	}
	for _, dir := range g.dirs {
		if err := os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("FROZEN"), 0o644); err != nil {
			return nil, fmt.Errorf("freezer: %w", err)
		}
	}
	deadline := time.Now().Add(timeout)
	for _, dir := range g.dirs {
		for {
			b, err := os.ReadFile(filepath.Join(dir, "freezer.state"))
			if err != nil {
				return nil, fmt.Errorf("freezer: %w", err)
			}
			if strings.TrimSpace(string(b)) == "FROZEN" {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("freezer: %s did not freeze within %s", dir, timeout)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	return g, nil
}

// Cgroup is the freezer cgroup of tree i, for CRIU's freeze_cgroup.
func (g *Group) Cgroup(i int) string { return g.dirs[i] }

// Thaw thaws the trees, moves every task back to the freezer cgroup it
// came from and removes the cgroups Freeze made.
func (g *Group) Thaw() error {
	var errs []error
	for _, dir := range g.dirs {
		if err := os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("THAWED"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for tid, from := range g.origin {
		if err := os.WriteFile(filepath.Join(Root, from, "tasks"), []byte(strconv.Itoa(tid)), 0o644); err != nil &&
			!errors.Is(err, os.ErrNotExist) && !isGone(err) {
			errs = append(errs, fmt.Errorf("freezer: move task %d back: %w", tid, err))
		}
	}
	for _, dir := range g.dirs {
		for i := 0; i < 100; i++ {
			if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			time.Sleep(10 * time.Millisecond) // tasks that just died may linger a moment
		}
	}
	_ = os.Remove(filepath.Join(Root, "cryo")) // only when empty
	return errors.Join(errs...)
}

func isGone(err error) bool { return strings.Contains(err.Error(), "no such process") }

func tasks(pid int) []int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return []int{pid}
	}
	var out []int
	for _, e := range ents {
		if t, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, t)
		}
	}
	return out
}

// current is the freezer cgroup of a task, relative to Root.
func current(tid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", tid))
	if err != nil {
		return "/"
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 && strings.Contains(","+parts[1]+",", ",freezer,") {
			return parts[2]
		}
	}
	return "/"
}
