package criu

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestDefaultCheckCache(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	cacheDir := func(d string) func() (string, error) {
		return func() (string, error) {
			if d == "" {
				return "", errors.New("no home")
			}
			return d, nil
		}
	}
	for _, tc := range []struct {
		name  string
		euid  int
		env   map[string]string
		cache string // the user's cache directory; "" none
		want  string
	}{
		{"root", 0, map[string]string{"XDG_RUNTIME_DIR": "/run/user/0"}, "/root/.cache", "/run/cryo"},
		{"user with a runtime directory", 1000, map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000"}, "/home/u/.cache", "/run/user/1000/cryo"},
		{"user without one", 1000, nil, "/home/u/.cache", "/home/u/.cache/cryo"},
		{"relative runtime directory ignored", 1000, map[string]string{"XDG_RUNTIME_DIR": "run"}, "/home/u/.cache", "/home/u/.cache/cryo"},
		{"user without any", 1000, nil, "", ""},
	} {
		if got := checkCacheFor(tc.euid, env(tc.env), cacheDir(tc.cache)); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// asUserEnv names, in the copy of this test run as a user, the fake CRIU.
const asUserEnv = "CRYO_TEST_CHECK_CACHE_CRIU"

// TestCheckStampIsWhatVetReads: as a user, the pass that Check (`cryo
// check`) records in DefaultCheckCache is the one Vet (every checkpoint
// and restore) reads, and Check refreshes it each time and forgets it when
// `criu check` fails. Root runs this test as nobody, with a fake CRIU that
// carries cap_checkpoint_restore; a user cannot give a file that capability.
func TestCheckStampIsWhatVetReads(t *testing.T) {
	if fake := os.Getenv(asUserEnv); fake != "" {
		checkStampAsUser(t, fake)
		return
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatal("needs root to give a fake CRIU a file capability, and CRYO_NO_SKIP=1 forbids skipping")
		}
		t.Skip("needs root to give a fake CRIU a file capability")
	}
	const nobody = 65534
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The fake and its call log; "fail" next to it makes `criu check` fail.
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil || os.Chown(bin, nobody, nobody) != nil {
		t.Fatal("setup", err)
	}
	fake := filepath.Join(bin, "criu")
	script := "#!/bin/sh\ncase \"$1\" in\n" +
		"--version) echo 'Version: 4.2.1';;\n" +
		"check) echo >>" + filepath.Join(bin, "check-calls") + "; if [ -e " + filepath.Join(bin, "fail") + " ]; then exit 1; fi; echo Looks good.;;\n" +
		"esac\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// VFS_CAP_REVISION_2, effective; cap_checkpoint_restore (40) permitted.
	capAttr := binary.LittleEndian.AppendUint32(nil, 0x02000000|1)
	for _, w := range []uint32{0, 0, 1 << (capCheckpointRestore - 32), 0} {
		capAttr = binary.LittleEndian.AppendUint32(capAttr, w)
	}
	if err := unix.Setxattr(fake, "security.capability", capAttr, 0); err != nil {
		t.Skipf("cannot give the fake CRIU a file capability here: %v", err)
	}
	// The user's runtime directory, and this test binary where they can run it.
	run := filepath.Join(dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil || os.Chown(run, nobody, nobody) != nil {
		t.Fatal("setup", err)
	}
	self := filepath.Join(dir, "criu.test")
	if err := copyExecutable(self); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), self, "-test.run=^TestCheckStampIsWhatVetReads$", "-test.v", "-test.count=1")
	cmd.Env = []string{asUserEnv + "=" + fake, "XDG_RUNTIME_DIR=" + run, "PATH=/usr/bin:/bin", "HOME=/nonexistent"}
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestCheckStampIsWhatVetReads") {
		t.Fatalf("as nobody: %v\n%s", err, out)
	}
	t.Logf("as nobody:\n%s", out)
}

// checkStampAsUser is the test's body, run as a user.
func checkStampAsUser(t *testing.T, fake string) {
	if os.Geteuid() == 0 {
		t.Fatal("runs as a user, not root")
	}
	cache := DefaultCheckCache()
	if want := filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "cryo"); cache != want {
		t.Fatalf("DefaultCheckCache as a user = %q, want %q", cache, want)
	}
	dir := filepath.Dir(fake)
	calls := func() int { return strings.Count(string(readOrEmpty(filepath.Join(dir, "check-calls"))), "\n") }
	stamps := func() int {
		ents, _ := os.ReadDir(cache)
		return len(ents)
	}
	b := Binary{Path: fake, Source: "--criu"}
	step := func(what string, op func() error, wantCalls, wantStamps int) {
		t.Helper()
		if err := op(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if n := calls(); n != wantCalls {
			t.Errorf("%s: criu check has run %d times, want %d", what, n, wantCalls)
		}
		if n := stamps(); n != wantStamps {
			t.Errorf("%s: %s holds %d stamps, want %d", what, cache, n, wantStamps)
		}
	}
	check := func() error {
		got, err := Check(t.Context(), b, cache)
		if err == nil && (!got.Unprivileged || got.VersionString() != "4.2.1") {
			err = errors.New("not an unprivileged CRIU 4.2.1")
		}
		return err
	}
	vet := func() error {
		got, err := Vet(t.Context(), b, cache)
		if err == nil && (!got.Unprivileged || got.VersionString() != "4.2.1") {
			err = errors.New("not an unprivileged CRIU 4.2.1 (from the stamp)")
		}
		return err
	}
	step("cryo check", check, 1, 1)
	step("a checkpoint after it", vet, 1, 1)
	step("cryo check again (always runs)", check, 2, 1)
	step("a checkpoint after it", vet, 2, 1)
	if err := os.WriteFile(filepath.Join(dir, "fail"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	step("cryo check that fails", func() error {
		if _, err := Check(t.Context(), b, cache); !errors.Is(err, ErrCheckFailed) {
			return errors.New("did not fail with ErrCheckFailed")
		}
		return nil
	}, 3, 0)
	if err := os.Remove(filepath.Join(dir, "fail")); err != nil {
		t.Fatal(err)
	}
	step("a checkpoint after the failure checks again", vet, 4, 1)
	step("and the next one trusts that", vet, 4, 1)
}

// copyExecutable copies the running test binary to path, executable by all.
func copyExecutable(path string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	in, err := os.Open(exe)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
