// Package proc reads what cryo needs to know about live processes from
// /proc: whether a PID is alive or dying, a process tree, its memory, its
// environment and command line, which signals it handles. Every package
// of cryo that reads /proc about a process does it here. Reads are
// bounded. It only reads; it never signals.
package proc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Stat is the part of /proc/<pid>/stat cryo uses.
type Stat struct {
	PID   int
	Comm  string
	State byte // R, S, D, Z, T, X, ...
	PPID  int
	PGID  int
	SID   int
	// Ticks of CPU time (user + system) used so far.
	CPUTicks uint64
	// Start time in clock ticks after boot: with the PID it names a process
	// uniquely across PID reuse.
	StartTime uint64
	Threads   int
	// Kernel is set for kernel threads (PF_KTHREAD), which have no memory,
	// environment or executable of their own.
	Kernel bool
}

// pfKthread is the kernel's PF_KTHREAD task flag, shown in stat's flags field.
const pfKthread = 0x00200000

// ErrNoProcess means no process has that PID.
var ErrNoProcess = errors.New("no such process")

// ReadStat reads /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, errors.ErrUnsupported) {
			return Stat{}, fmt.Errorf("pid %d: %w", pid, ErrNoProcess)
		}
		return Stat{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return parseStat(pid, string(b))
}

func parseStat(pid int, s string) (Stat, error) {
	// comm may hold spaces and parentheses: it ends at the last ')'.
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open || end+2 >= len(s) {
		return Stat{}, fmt.Errorf("pid %d: malformed stat", pid)
	}
	st := Stat{PID: pid, Comm: s[open+1 : end]}
	f := strings.Fields(s[end+2:])
	if len(f) < 20 {
		return Stat{}, fmt.Errorf("pid %d: short stat", pid)
	}
	st.State = f[0][0]
	st.PPID, _ = strconv.Atoi(f[1])
	st.PGID, _ = strconv.Atoi(f[2])
	st.SID, _ = strconv.Atoi(f[3])
	flags, _ := strconv.ParseUint(f[6], 10, 64)
	st.Kernel = flags&pfKthread != 0
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	stt, _ := strconv.ParseUint(f[12], 10, 64)
	st.CPUTicks = ut + stt
	st.Threads, _ = strconv.Atoi(f[17])
	st.StartTime, _ = strconv.ParseUint(f[19], 10, 64)
	return st, nil
}

// Live reports whether pid names a process that is not a zombie or dead.
func Live(pid int) bool {
	st, err := ReadStat(pid)
	return err == nil && st.State != 'Z' && st.State != 'X'
}

// Exists reports whether anything (even a zombie) holds pid.
func Exists(pid int) bool {
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	return err == nil
}

// WaitGone waits until no process holds pid, or ctx ends.
func WaitGone(ctx context.Context, pid int) error {
	for Exists(pid) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("pid %d still exists: %w", pid, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// Tree returns pid and all its descendants, pid first.
func Tree(pid int) ([]int, error) {
	if _, err := ReadStat(pid); err != nil {
		return nil, err
	}
	children := map[int][]int{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := ReadStat(p)
		if err != nil {
			continue
		}
		children[st.PPID] = append(children[st.PPID], p)
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out, nil
}

// RSS returns the resident memory of pid in bytes (from smaps_rollup, or
// statm where that is missing).
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"))
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "Rss:") {
				f := strings.Fields(line)
				if len(f) >= 2 {
					kb, _ := strconv.ParseInt(f[1], 10, 64)
					return kb << 10, nil
				}
			}
		}
	}
	b, err = os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "statm"))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("pid %d: malformed statm", pid)
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize()), nil
}

// StatusInts is the numbers of the field named key in /proc/PID/status
// ("Uid", "NSpid", ...); nil with no error when there is no such field.
func StatusInts(pid int, key string) ([]int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNoProcess)
		}
		return nil, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			var ids []int
			for _, f := range strings.Fields(rest) {
				n, err := strconv.Atoi(f)
				if err != nil {
					return nil, fmt.Errorf("pid %d: bad %s line %q", pid, key, line)
				}
				ids = append(ids, n)
			}
			return ids, nil
		}
	}
	return nil, nil
}

// NSpid is the PID of pid in each PID namespace it is in, from the
// outermost (the one pid is given in) to its own (the NSpid line of
// /proc/PID/status).
func NSpid(pid int) ([]int, error) {
	ids, err := StatusInts(pid, "NSpid")
	if err == nil && ids == nil {
		return []int{pid}, nil // a kernel without NSpid has no PID namespaces to tell
	}
	return ids, err
}

// InnerPIDs maps the PIDs that the processes of t below root have in
// their own PID namespace (as root's PID namespace sees them: root is 1
// when it is that namespace's init) to their PIDs here.
func InnerPIDs(t map[int]Stat, root int) map[int]int {
	out := map[int]int{}
	for _, p := range Descendants(t, root) {
		if ids, err := NSpid(p); err == nil && len(ids) > 0 {
			out[ids[len(ids)-1]] = p
		}
	}
	return out
}
