package criu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
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
	// ErrNoCapability means cryo runs as a user who is not root and the
	// CRIU found lacks the file capability cap_checkpoint_restore, without
	// which it cannot checkpoint or restore even the user's own processes.
	ErrNoCapability = errors.New("criu lacks cap_checkpoint_restore")
)

// Binary is a CRIU executable that passed Vet.
type Binary struct {
	Path    string // absolute path
	Source  string // how it was found: "--criu", "CRYO_CRIU" or "PATH"
	Version int    // major*10000 + minor*100 + sublevel
	// Unprivileged: cryo runs as a user who is not root, so CRIU runs as
	// that user with --unprivileged and its file capability, on that
	// user's processes only (Vet sets it).
	Unprivileged bool
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
	if p := installed(); p != "" {
		return try(p, "the cryo installation")
	}
	p, err := exec.LookPath("criu")
	if err != nil {
		return Binary{}, fmt.Errorf("%w: not given by --criu or CRYO_CRIU, not installed with cryo and not on PATH; an admin installs it with `make install` (scripts/install-criu.sh)", ErrNotFound)
	}
	return try(p, "PATH")
}

// InstalledRel is where `make install` puts CRIU, relative to the
// directory of the cryo binary (PREFIX/bin/cryo, PREFIX/lib/cryo/criu).
const InstalledRel = "../lib/cryo/criu/sbin/criu"

// installed is the CRIU installed with the running cryo, if there is one.
func installed() string {
	self, err := os.Executable()
	if err != nil {
		return ""
	}
	p := filepath.Join(filepath.Dir(self), InstalledRel)
	if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
		return p
	}
	return ""
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

// Vet checks that b is usable: version >= MinVersion and `criu check`
// passes; run as a user who is not root, also that b has the file
// capability cap_checkpoint_restore, and then b is Unprivileged. A passing
// `criu check` is remembered with the version per binary (path, size,
// mtime), kernel and user under cacheDir, so that a checkpoint or restore
// does not pay for either again (CRIU takes 40-50 ms just to start);
// cacheDir is DefaultCheckCache() for every cryo operation, and "" disables
// the cache. Check is Vet without trusting the cache.
func Vet(ctx context.Context, b Binary, cacheDir string) (Binary, error) {
	return vet(ctx, b, cacheDir, true)
}

// Check is Vet for `cryo check`: it always runs `criu check`, and records
// the outcome in cacheDir (a pass, or forgetting an old pass), so that
// checkpoints never use a pass that `cryo check` would not give now.
func Check(ctx context.Context, b Binary, cacheDir string) (Binary, error) {
	return vet(ctx, b, cacheDir, false)
}

func vet(ctx context.Context, b Binary, cacheDir string, useCache bool) (Binary, error) {
	b.Unprivileged = !privilege.Root()
	if !b.Unprivileged {
		// Root runs only a CRIU that no one else can change, wherever it
		// was found (a flag, CRYO_CRIU kept by sudo, PATH).
		if err := privilege.Trusted(b.Path); err != nil {
			return b, fmt.Errorf("as root, cryo runs only a CRIU that root alone can change; %s (via %s): %w", b.Path, b.Source, err)
		}
	}
	if b.Unprivileged {
		if err := capable(b.Path); err != nil {
			return b, fmt.Errorf("%w: %s (via %s): %v", ErrNoCapability, b.Path, b.Source, err)
		}
	}
	stamp := ""
	if cacheDir != "" {
		stamp = checkStamp(b.Path, cacheDir)
	}
	if stamp != "" && useCache {
		if rec, err := os.ReadFile(stamp); err == nil {
			if v, err := ParseVersion(string(rec)); err == nil && v >= MinVersion {
				b.Version = v
				return b, nil
			}
		}
	}
	if stamp != "" {
		_ = os.Remove(stamp) // a pass is remembered only once it is seen again
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
	args := []string{"check"}
	if b.Unprivileged {
		args = append(args, "--unprivileged")
	}
	cmd := exec.CommandContext(ctx, b.Path, args...)
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
	fmt.Fprintf(h, "%s\x00%d\x00%d\x00%s\x00%s\x00%d", path, st.Size(), st.ModTime().UnixNano(),
		unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Version[:]), os.Geteuid())
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
		args := []string{"check", "--feature", feature}
		if b.Unprivileged {
			args = append(args, "--unprivileged")
		}
		return exec.CommandContext(ctx, b.Path, args...).Run() == nil
	}
	return Features{DirtyTracking: has("mem_dirty_track"), LazyPages: has("uffd-noncoop")}
}
