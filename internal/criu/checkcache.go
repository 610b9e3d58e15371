package criu

import (
	"os"
	"path/filepath"
)

// DefaultCheckCache is the directory where Vet remembers a passing `criu
// check` and Check records its outcome, for every cryo operation (a
// command, `cryo run`, the Go API): one per identity, since a pass is
// recorded for the user who ran it. Root's is /run/cryo (node-local); a
// user's is $XDG_RUNTIME_DIR/cryo, else cryo/ in their cache directory
// ($XDG_CACHE_HOME or ~/.cache), else "" (no cache). A user's `cryo check`
// and their checkpoints therefore share one cache, and root's never mixes
// with it.
func DefaultCheckCache() string {
	return checkCacheFor(os.Geteuid(), os.Getenv, os.UserCacheDir)
}

// checkCacheFor is DefaultCheckCache for euid, with the environment and
// the cache directory given.
func checkCacheFor(euid int, getenv func(string) string, userCacheDir func() (string, error)) string {
	if euid == 0 {
		return "/run/cryo"
	}
	if d := getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return filepath.Join(d, "cryo")
	}
	if d, err := userCacheDir(); err == nil {
		return filepath.Join(d, "cryo")
	}
	return ""
}
