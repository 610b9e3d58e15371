// Package workdir makes the private, short-lived directories where CRIU
// images live between CRIU and the store: RAM-backed (/dev/shm) when there
// is room, so uncompressed pages never reach durable storage, else a
// directory on the store's file system. Directories are 0700 and named
// after the creating PID, so that Sweep can remove what a killed cryo left.
package workdir

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// RAM is the RAM-backed base directory tried first.
const RAM = "/dev/shm"

const prefix = "cryo-work-"

// Make creates a work directory able to hold need bytes: under base when
// base is given, else under RAM if it has room, else under fallback. It
// returns the directory; the caller removes it.
func Make(base, fallback string, need int64) (string, error) {
	candidates := []string{base}
	if base == "" {
		candidates = []string{RAM, fallback}
	}
	var tried []string
	for _, b := range candidates {
		if b == "" {
			continue
		}
		if free, err := Free(b); err != nil || (free < need && base == "") {
			tried = append(tried, fmt.Sprintf("%s (%s free)", b, human(free)))
			continue
		}
		Sweep(b)
		d, err := os.MkdirTemp(b, prefix+strconv.Itoa(os.Getpid())+"-")
		if err != nil {
			return "", fmt.Errorf("make work dir in %s: %w", b, err)
		}
		return d, os.Chmod(d, 0o700)
	}
	return "", fmt.Errorf("no room for %s of images: tried %s", human(need), strings.Join(tried, ", "))
}

// Free is the space available to root under dir.
func Free(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bfree) * st.Bsize, nil
}

// Sweep removes work directories under base whose creating cryo is gone.
func Sweep(base string) {
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() || proc.Live(pid) {
			continue
		}
		os.RemoveAll(filepath.Join(base, e.Name()))
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d KiB", n>>10)
	}
}
