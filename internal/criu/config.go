package criu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cryo-hpc/cryo/internal/privilege"
)

// ErrBadConfig means a CRIU configuration file given to cryo cannot be
// used: it is missing, not a regular file, or (as root) one that someone
// other than root could change.
var ErrBadConfig = errors.New("CRIU configuration file not usable")

// ConfigFile vets a CRIU configuration file that a user hands through to
// CRIU (Options.ConfigFile, `--criu-config`) for the options cryo does not
// know, and returns its absolute path ("" for none). CRIU reads it in
// its own syntax, one long option per line. As root the file, and every
// directory above it, must be root's alone (privilege.Trusted): a CRIU
// configuration names scripts CRIU runs (--action-script) and where it
// loads plugins from, so a file a user could change would run their code
// as root.
//
// CRIU gives the file the last word over the options cryo sets in a swrk
// request, and the first in a command line: it must not set what cryo
// decides itself (images, work directory, log, the tree, restore-sibling).
func ConfigFile(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("%w: %s: %w", ErrBadConfig, path, err)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadConfig, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%w: %s is not a regular file", ErrBadConfig, abs)
	}
	f, err := os.Open(abs)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadConfig, err)
	}
	f.Close()
	if privilege.Root() {
		if err := privilege.Trusted(abs); err != nil {
			return "", fmt.Errorf("%w: as root, CRIU reads a configuration only from where root alone can change it (it may name scripts CRIU runs): %w", ErrBadConfig, err)
		}
	}
	return abs, nil
}
