package proc

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// PIDs lists the processes in /proc, in ascending order.
func PIDs() ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids, nil
}

// maxEnviron bounds ReadEnviron: beyond any exec's limit on a normal stack.
const maxEnviron = 16 << 20

// ReadEnviron reads /proc/<pid>/environ in one read(2) into buf, grown as
// needed (to 16 MiB), and returns the environment (NUL-separated) and the
// buffer to pass next time. A kernel thread, a zombie, or a process caught
// inside execve (until the kernel has built its new stack) reads as empty.
//
// One read is one look at one address space. A file opened before an exec
// reads the old one, and each further read(2) gives up once it is gone:
// reading in pieces, as os.ReadFile does, can return the head of the old
// environment and then end, which looks like a complete environment
// without the variables at its end.
func ReadEnviron(pid int, buf []byte) (env, next []byte, err error) {
	if len(buf) == 0 {
		buf = make([]byte, 64<<10)
	}
	for {
		fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/environ", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, buf, fmt.Errorf("pid %d: environ: %w", pid, err)
		}
		n, err := unix.Read(fd, buf)
		for err == unix.EINTR {
			n, err = unix.Read(fd, buf)
		}
		unix.Close(fd)
		if err != nil {
			return nil, buf, fmt.Errorf("pid %d: environ: %w", pid, err)
		}
		if n < len(buf) || len(buf) >= maxEnviron {
			return buf[:n], buf, nil
		}
		buf = make([]byte, 4*len(buf))
	}
}

// EnvHasAll reports whether a NUL-separated environment (ReadEnviron)
// holds every one of the entries ("NAME=value").
func EnvHasAll(env []byte, entries [][]byte) bool {
	n := 0
	for _, kv := range bytes.Split(env, []byte{0}) {
		for _, w := range entries {
			if bytes.Equal(kv, w) {
				n++
			}
		}
	}
	return n >= len(entries)
}

// Cmdline returns the command line of pid (at most 4 MiB of it).
func Cmdline(pid int) ([]string, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("pid %d: cmdline: %w", pid, err)
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, nil
	}
	return strings.Split(string(b), "\x00"), nil
}

// SignalsHandled returns the signals pid catches or ignores (SigCgt |
// SigIgn of /proc/<pid>/status): bit n-1 is signal n.
func SignalsHandled(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, fmt.Errorf("pid %d: %w", pid, err)
	}
	var mask uint64
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && (k == "SigCgt" || k == "SigIgn") {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return 0, fmt.Errorf("pid %d: status: %s: %w", pid, k, err)
			}
			mask |= m
			found++
		}
	}
	if found != 2 {
		return 0, fmt.Errorf("pid %d: status has no SigCgt/SigIgn", pid)
	}
	return mask, nil
}

// FDFlags reads the open flags of pid's descriptor fd (a name in
// /proc/PID/fd) from its fdinfo; ok is false when they cannot be read.
func FDFlags(pid int, fd string) (flags uint64, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/fdinfo/" + fd)
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, found := strings.CutPrefix(line, "flags:"); found {
			f, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			return f, err == nil
		}
	}
	return 0, false
}
