package criu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// MinVersion is the oldest CRIU cryo accepts (major*10000 + minor*100 + sub).
// CRIU 3.x fails on current kernels (rt vDSO bounds) and lacks RPC options
// cryo relies on.
const MinVersion = 40000

var (
	// ErrNotFound means no CRIU binary was found where cryo looked.
	ErrNotFound = errors.New("criu not found")
	// ErrCRIUTooOld means the CRIU found is older than MinVersion.
	ErrCRIUTooOld = errors.New("criu too old")
	// ErrCheckFailed means `criu check` did not pass on this kernel.
	ErrCheckFailed = errors.New("criu check failed")
	// ErrNotRoot means CRIU cannot work because cryo is not running as root.
	ErrNotRoot = errors.New("not running as root")
)

// Binary is a CRIU executable that passed Vet.
type Binary struct {
	Path    string // absolute path
	Source  string // how it was found: "--criu", "CRYO_CRIU" or "PATH"
	Version int    // major*10000 + minor*100 + sublevel
}

// VersionString renders Version as "4.1.1".
func (b Binary) VersionString() string {
	return fmt.Sprintf("%d.%d.%d", b.Version/10000, b.Version/100%100, b.Version%100)
}

// Locate resolves which CRIU to use: explicit (from --criu) first, then the
// CRYO_CRIU environment variable, then "criu" on PATH. It does not run it.
func Locate(explicit string, getenv func(string) string) (Binary, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	try := func(p, src string) (Binary, error) {
		abs, err := exec.LookPath(p)
		if err != nil {
			return Binary{}, fmt.Errorf("%w: %s %q is not an executable file", ErrNotFound, src, p)
		}
		abs, _ = filepath.Abs(abs)
		return Binary{Path: abs, Source: src}, nil
	}
	if explicit != "" {
		return try(explicit, "--criu")
	}
	if p := getenv("CRYO_CRIU"); p != "" {
		return try(p, "CRYO_CRIU")
	}
	p, err := exec.LookPath("criu")
	if err != nil {
		return Binary{}, fmt.Errorf("%w: not given by --criu or CRYO_CRIU and not on PATH; run scripts/install-criu.sh (or `make deps`) to build CRIU 4.1.1", ErrNotFound)
	}
	return try(p, "PATH")
}

var versionRE = regexp.MustCompile(`Version:\s*(\d+)\.(\d+)(?:\.(\d+))?`)

// ParseVersion reads the output of `criu --version`.
func ParseVersion(out string) (int, error) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("unrecognised `criu --version` output %q", strings.TrimSpace(out))
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	sub := 0
	if m[3] != "" {
		sub, _ = strconv.Atoi(m[3])
	}
	return major*10000 + minor*100 + sub, nil
}

// Vet checks that b is usable: run as root, version >= MinVersion, and
// `criu check` passes. A passing `criu check` is remembered with the
// version per binary (path, size, mtime) and kernel under cacheDir, so that
// a checkpoint or restore does not pay for either again (CRIU takes 40-50
// ms just to start); cacheDir "" disables the cache.
func Vet(ctx context.Context, b Binary, cacheDir string) (Binary, error) {
	if os.Geteuid() != 0 {
		return b, fmt.Errorf("%w: CRIU needs root to checkpoint or restore processes (found %s via %s)", ErrNotRoot, b.Path, b.Source)
	}
	stamp := ""
	if cacheDir != "" {
		stamp = checkStamp(b.Path, cacheDir)
	}
	if stamp != "" {
		if rec, err := os.ReadFile(stamp); err == nil {
			if v, err := ParseVersion(string(rec)); err == nil && v >= MinVersion {
				b.Version = v
				return b, nil
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.Path, "--version").CombinedOutput()
	if err != nil {
		return b, fmt.Errorf("%w: %s (via %s): `criu --version`: %v", ErrNotFound, b.Path, b.Source, err)
	}
	v, err := ParseVersion(string(out))
	if err != nil {
		return b, fmt.Errorf("%s (via %s): %w", b.Path, b.Source, err)
	}
	b.Version = v
	if v < MinVersion {
		return b, fmt.Errorf("%w: %s (via %s) is CRIU %s; cryo needs >= 4.0 (CRIU 3.x fails on current kernels); run scripts/install-criu.sh", ErrCRIUTooOld, b.Path, b.Source, b.VersionString())
	}
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, b.Path, "check")
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil || !strings.Contains(buf.String(), "Looks good") {
		return b, fmt.Errorf("%w: %s (via %s, CRIU %s) on this kernel: %s", ErrCheckFailed, b.Path, b.Source, b.VersionString(), lastLines(buf.String(), 3))
	}
	if stamp != "" {
		_ = os.MkdirAll(filepath.Dir(stamp), 0o700)
		_ = os.WriteFile(stamp, []byte("Version: "+b.VersionString()+"\n"), 0o600)
	}
	return b, nil
}

// checkStamp names the cache file that records a passing `criu check` for
// this exact binary on this exact kernel.
func checkStamp(path, dir string) string {
	st, err := os.Stat(path)
	if err != nil {
		return ""
	}
	var u unix.Utsname
	_ = unix.Uname(&u)
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%d\x00%d\x00%s\x00%s", path, st.Size(), st.ModTime().UnixNano(),
		unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Version[:]))
	return filepath.Join(dir, "criu-check-"+hex.EncodeToString(h.Sum(nil))[:24])
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// Features are the optional kernel capabilities CRIU can use here.
type Features struct {
	// DirtyTracking: soft-dirty page tracking, which lets CRIU skip pages a
	// job did not touch since the previous dump (pre-dump, track-mem).
	DirtyTracking bool `json:"dirty_tracking"`
	// LazyPages: userfaultfd, which lets a restore start the job before all
	// of its memory is back.
	LazyPages bool `json:"lazy_pages"`
}

// Probe asks CRIU which optional features this kernel offers.
func Probe(ctx context.Context, b Binary) Features {
	has := func(feature string) bool {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, b.Path, "check", "--feature", feature).Run() == nil
	}
	return Features{DirtyTracking: has("mem_dirty_track"), LazyPages: has("uffd-noncoop")}
}
