package criu

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseVersion(t *testing.T) {
	tests := []struct {
		out     string
		want    int
		wantErr bool
	}{
		{"Version: 4.1.1\n", 40101, false},
		{"Version: 4.1\n", 40100, false},
		{"Version: 3.17\nGitID: v3.17\n", 31700, false},
		{"Version: 3.17.1\nGitID: v3.17.1-2-gdeadbeef\n", 31701, false},
		{"Version:   4.0.0   \n", 40000, false},
		{"Version: 10.2.3\n", 100203, false},
		{"", 0, true},
		{"criu: command not found\n", 0, true},
		{"Version: four\n", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseVersion(tc.out)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("ParseVersion(%q) = %d, %v; want %d, error %v", tc.out, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestVersionString(t *testing.T) {
	for v, want := range map[int]string{40101: "4.1.1", 31700: "3.17.0", 100203: "10.2.3"} {
		if got := (Binary{Version: v}).VersionString(); got != want {
			t.Errorf("VersionString(%d) = %q, want %q", v, got, want)
		}
	}
}

func TestLocate(t *testing.T) {
	dir := t.TempDir()
	exe := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("#!/bin/sh\necho Version: 4.1.1\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	flagBin := exe("flag/criu")
	envBin := exe("env/criu")
	pathBin := exe("path/criu")
	notExec := filepath.Join(dir, "plain")
	if err := os.WriteFile(notExec, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "CRYO_CRIU" {
				return v
			}
			return ""
		}
	}
	const (
		onPath = "path"
		noPath = "none"
	)

	tests := []struct {
		name     string
		explicit string
		env      string
		path     string // onPath: criu on PATH; noPath: PATH without criu
		want     string
		source   string
		wantErr  string
	}{
		{"flag beats env and PATH", flagBin, envBin, onPath, flagBin, "--criu", ""},
		{"env beats PATH", "", envBin, onPath, envBin, "CRYO_CRIU", ""},
		{"PATH last", "", "", onPath, pathBin, "PATH", ""},
		{"nothing anywhere", "", "", noPath, "", "", "not on PATH"},
		{"flag names a missing file", filepath.Join(dir, "missing"), envBin, onPath, "", "", "--criu"},
		{"flag names a non-executable", notExec, "", onPath, "", "", "--criu"},
		{"env names a missing file, PATH is not tried", "", filepath.Join(dir, "missing"), onPath, "", "", "CRYO_CRIU"},
		{"flag given as a name on PATH", "criu", "", onPath, pathBin, "--criu", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.path == onPath {
				t.Setenv("PATH", filepath.Dir(pathBin))
			} else {
				t.Setenv("PATH", t.TempDir())
			}
			b, err := Locate(tc.explicit, env(tc.env))
			if tc.wantErr != "" {
				if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Locate: err = %v, want ErrNotFound mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b.Path != tc.want || b.Source != tc.source {
				t.Errorf("Locate = %s via %s, want %s via %s", b.Path, b.Source, tc.want, tc.source)
			}
		})
	}
}

func TestLocateRelativeIsMadeAbsolute(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "criu"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	b, err := Locate("./criu", func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if b.Path != filepath.Join(dir, "criu") {
		t.Errorf("Locate(./criu) = %q, want %q", b.Path, filepath.Join(dir, "criu"))
	}
}

// TestVet runs Vet against fake CRIU binaries (shell scripts). Vet refuses
// to work without root before it runs anything, so as a normal user the
// test checks that refusal, and as root the version and `criu check` gates
// and the cache of a passing check.
func TestVet(t *testing.T) {
	fake := func(t *testing.T, version, check string) (Binary, string) {
		dir := t.TempDir()
		calls := filepath.Join(dir, "check-calls")
		script := "#!/bin/sh\ncase \"$1\" in\n" +
			"--version) echo 'Version: " + version + "';;\n" +
			"check) echo >>" + calls + "; " + check + ";;\n" +
			"esac\n"
		p := filepath.Join(dir, "criu")
		if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		return Binary{Path: p, Source: "--criu"}, calls
	}
	if os.Geteuid() != 0 {
		// A script cannot carry a file capability: as a user, Vet refuses
		// it before running it, and says what an admin runs.
		b, calls := fake(t, "4.1.1", "echo Looks good.")
		_, err := Vet(t.Context(), b, "")
		if !errors.Is(err, ErrNoCapability) || !strings.Contains(err.Error(), b.Path) || !strings.Contains(err.Error(), AdminFix(b.Path)) {
			t.Errorf("Vet as a user of a CRIU without the capability: %v, want ErrNoCapability naming %s and %q", err, b.Path, AdminFix(b.Path))
		}
		if _, serr := os.Stat(calls); serr == nil {
			t.Error("Vet ran `criu check` of a CRIU that cannot work for this user")
		}
		return
	}
	tests := []struct {
		name, version, check string
		want                 error
		wantMsg              string
	}{
		{"good", "4.1.1", "echo Looks good.", nil, ""},
		{"too old", "3.17", "echo Looks good.", ErrCRIUTooOld, "CRIU 3.17.0"},
		{"check fails", "4.1.1", "echo 'Error (criu/kerndat.c:1): no vdso'; exit 1", ErrCheckFailed, "no vdso"},
		{"check says nothing good", "4.0", "echo Warn: something", ErrCheckFailed, "Warn: something"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := fake(t, tc.version, tc.check)
			got, err := Vet(t.Context(), b, "")
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if got.VersionString() != tc.version {
					t.Errorf("Vet found version %s, want %s", got.VersionString(), tc.version)
				}
				return
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.wantMsg) || !strings.Contains(err.Error(), b.Path) {
				t.Errorf("Vet: %v, want %v naming %s and saying %q", err, tc.want, b.Path, tc.wantMsg)
			}
		})
	}
	t.Run("passing check is cached", func(t *testing.T) {
		b, calls := fake(t, "4.1.1", "echo Looks good.")
		cache := t.TempDir()
		for range 3 {
			got, err := Vet(t.Context(), b, cache)
			if err != nil {
				t.Fatal(err)
			}
			if got.VersionString() != "4.1.1" {
				t.Errorf("Vet found version %s, want 4.1.1 (from the cache too)", got.VersionString())
			}
		}
		if n := strings.Count(string(readOrEmpty(calls)), "\n"); n != 1 {
			t.Errorf("criu check ran %d times for 3 Vets with a cache, want 1", n)
		}
		// An older cache entry without the version is checked again.
		ents, _ := os.ReadDir(cache)
		if len(ents) != 1 {
			t.Fatalf("cache holds %d entries, want 1", len(ents))
		}
		if err := os.WriteFile(filepath.Join(cache, ents[0].Name()), []byte("4.1.1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Vet(t.Context(), b, cache); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(readOrEmpty(calls)), "\n"); n != 2 {
			t.Errorf("criu check ran %d times after the cache entry lost its version, want 2", n)
		}
		// A changed binary is checked again.
		if err := os.WriteFile(b.Path+".new", []byte("#!/bin/sh\ncase \"$1\" in --version) echo 'Version: 4.1.1';; check) echo >>"+calls+"; echo Looks good.;; esac\n#changed\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(b.Path+".new", b.Path); err != nil {
			t.Fatal(err)
		}
		if _, err := Vet(t.Context(), b, cache); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(readOrEmpty(calls)), "\n"); n != 3 {
			t.Errorf("criu check ran %d times after the binary changed, want 3", n)
		}
	})
	t.Run("failing check is not cached", func(t *testing.T) {
		b, calls := fake(t, "4.1.1", "exit 1")
		cache := t.TempDir()
		for range 2 {
			if _, err := Vet(t.Context(), b, cache); !errors.Is(err, ErrCheckFailed) {
				t.Fatalf("Vet: %v, want ErrCheckFailed", err)
			}
		}
		if n := strings.Count(string(readOrEmpty(calls)), "\n"); n != 2 {
			t.Errorf("criu check ran %d times for 2 Vets of a failing CRIU, want 2", n)
		}
	})
}

// TestHasCap reads security.capability values as the kernel lays them
// out (include/uapi/linux/capability.h).
func TestHasCap(t *testing.T) {
	attr := func(magic uint32, words ...uint32) []byte {
		b := binary.LittleEndian.AppendUint32(nil, magic)
		for _, w := range words {
			b = binary.LittleEndian.AppendUint32(b, w)
		}
		return b
	}
	const eff = 1
	bit40 := uint32(1) << (40 - 32)
	tests := []struct {
		name    string
		b       []byte
		want    bool
		wantErr bool
	}{
		{"v2 cap_checkpoint_restore=eip", attr(0x02000000|eff, 0, 0, bit40, 0), true, false},
		{"v3 (namespaced) too", attr(0x03000000|eff, 0, 0, bit40, bit40, 1000), true, false},
		{"permitted but not effective", attr(0x02000000, 0, 0, bit40, 0), false, false},
		{"only inheritable", attr(0x02000000|eff, 0, 0, 0, bit40), false, false},
		{"another capability (cap_sys_ptrace=ep)", attr(0x02000000|eff, 1<<19, 0, 0, 0), false, false},
		{"v1 has no capability 40", attr(0x01000000|eff, 0xffffffff, 0), false, false},
		{"unknown revision", attr(0x07000000|eff, 0, 0, bit40, 0), false, true},
		{"truncated", attr(0x02000000|eff, 0, 0), false, true},
		{"empty", nil, false, true},
	}
	for _, tc := range tests {
		got, err := hasCap(tc.b, capCheckpointRestore)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("%s: hasCap = %v, %v; want %v, error %v", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

func readOrEmpty(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}
