package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/cli"
	"github.com/cryo-hpc/cryo/internal/store"
)

// run calls cli.Main as the cryo binary would be called, with a clean
// CRYO_* environment.
func run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	for _, k := range []string{"CRYO_STORE", "CRYO_JSON", "CRYO_VERBOSE", "CRYO_KEEP", "CRYO_WORK_DIR", "CRYO_CRIU"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code = cli.Main(ctx, append([]string{"cryo"}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func TestExitCodes(t *testing.T) {
	st := filepath.Join(t.TempDir(), "store")
	missing := filepath.Join(t.TempDir(), "no-such-store")
	dead := strconv.Itoa(freePID(t))
	// A stand-in CRIU: these cases must fail before CRIU would run.
	fake := "--criu=/bin/true"
	tests := []struct {
		name string
		args []string
		code int
		msg  string // in stderr
	}{
		{"unknown command", []string{"chekpoint", "1"}, cli.ExitUsage, `unknown command "chekpoint"`},
		{"unknown flag", []string{"checkpoint", "--store", st, "--frobnicate", "1"}, cli.ExitUsage, "frobnicate"},
		{"checkpoint without --store", []string{"checkpoint", "123"}, cli.ExitUsage, "store"},
		{"checkpoint without PID", []string{"checkpoint", "--store", st}, cli.ExitUsage, "needs the PID"},
		{"checkpoint with a bad second PID", []string{"checkpoint", "--store", st, "1", "x2"}, cli.ExitUsage, `"x2"`},
		{"non-numeric PID", []string{"checkpoint", "--store", st, "12abc"}, cli.ExitUsage, `"12abc"`},
		{"zero PID", []string{"checkpoint", "--store", st, "0"}, cli.ExitUsage, "positive"},
		{"negative PID", []string{"checkpoint", "--store", st, "-5"}, cli.ExitUsage, "-5"},
		{"--leave-running with --kill", []string{"checkpoint", "--store", st, "--leave-running", "--kill", "1"}, cli.ExitUsage, "contradict"},
		{"negative --keep", []string{"checkpoint", "--store", st, "--keep", "-1", "1"}, cli.ExitUsage, "--keep"},
		{"bad --lock-wait", []string{"checkpoint", "--store", st, "--lock-wait", "soon", "1"}, cli.ExitUsage, "soon"},
		{"restore without --store", []string{"restore"}, cli.ExitUsage, "store"},
		{"restore with an argument", []string{"restore", "--store", st, "7"}, cli.ExitUsage, "no arguments"},
		{"negative --generation", []string{"restore", "--store", st, "--generation", "-1"}, cli.ExitUsage, "--generation"},
		{"list with an argument", []string{"list", "--store", st, "extra"}, cli.ExitUsage, "no arguments"},
		{"verify with an argument", []string{"verify", "--store", st, "extra"}, cli.ExitUsage, "no arguments"},
		{"gc with an argument", []string{"gc", "--store", st, "extra"}, cli.ExitUsage, "no arguments"},
		{"list without --store", []string{"list"}, cli.ExitUsage, "store"},

		{"checkpoint of a nonexistent PID", []string{"checkpoint", fake, "--store", st, dead}, cli.ExitFailed, "pid " + dead},
		{"checkpoint with a missing CRIU", []string{"checkpoint", "--criu", filepath.Join(missing, "criu"), "--store", st, dead}, cli.ExitFailed, "criu not found"},
		{"restore from a missing store", []string{"restore", fake, "--store", missing}, cli.ExitFailed, missing},
		{"list of a missing store", []string{"list", "--store", missing}, cli.ExitFailed, "not a cryo store"},
		{"verify of a missing store", []string{"verify", "--store", missing}, cli.ExitFailed, "not a cryo store"},
		{"gc of a missing store", []string{"gc", "--store", missing}, cli.ExitFailed, "not a cryo store"},

		{"version", []string{"version"}, cli.ExitOK, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := run(t, tc.args...)
			if code != tc.code {
				t.Errorf("cryo %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(tc.args, " "), code, tc.code, stdout, stderr)
			}
			if !strings.Contains(stderr, tc.msg) {
				t.Errorf("cryo %s: stderr %q should say %q", strings.Join(tc.args, " "), stderr, tc.msg)
			}
			if tc.code != cli.ExitOK && strings.TrimSpace(stdout) != "" && !strings.Contains(stdout, "USAGE") {
				t.Errorf("cryo %s failed but printed a result: %q", strings.Join(tc.args, " "), stdout)
			}
		})
	}
	// None of the refused commands may have created the store.
	if _, err := os.Stat(st); err == nil {
		t.Errorf("a refused command created the store %s", st)
	}
}

func TestNonexistentPIDMessage(t *testing.T) {
	st := filepath.Join(t.TempDir(), "store")
	pid := strconv.Itoa(freePID(t))
	code, _, stderr := run(t, "checkpoint", "--criu=/bin/true", "--store", st, pid)
	if code != cli.ExitFailed || !strings.Contains(stderr, "pid "+pid) || !strings.Contains(stderr, "no such process") {
		t.Errorf("exit %d, stderr %q; want 1 and a message naming pid %s as missing", code, stderr, pid)
	}
}

func TestVersion(t *testing.T) {
	code, stdout, _ := run(t, "version")
	if code != 0 || !strings.HasPrefix(stdout, "cryo ") {
		t.Errorf("cryo version: exit %d, %q", code, stdout)
	}
}

// TestListVerifyOnStore runs list and verify on a store built with the
// store package (no CRIU needed), intact and then damaged.
func TestListVerifyOnStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := run(t, "list", "--store", dir, "--json")
	if code != 0 || strings.TrimSpace(stdout) != "[]" {
		t.Fatalf("list --json of an empty store: exit %d, %q, %q", code, stdout, stderr)
	}
	if code, stdout, _ = run(t, "list", "--store", dir); code != 0 || !strings.Contains(stdout, "no checkpoints") {
		t.Errorf("list of an empty store: exit %d, %q", code, stdout)
	}

	img := filepath.Join(t.TempDir(), "pages-1.img")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var m *store.Manifest
	for range 2 {
		w, err := s.NewWriter()
		if err != nil {
			t.Fatal(err)
		}
		if err := w.AddFiles(context.Background(), []store.FileSpec{{Path: img, Name: "pages-1.img", Kind: "pages"}}); err != nil {
			t.Fatal(err)
		}
		m = &store.Manifest{Job: store.Job{RootPID: 777, Processes: []store.Process{{PID: 777}, {PID: 778, PPID: 777}}}}
		if _, err := w.Commit(m); err != nil {
			t.Fatal(err)
		}
	}

	code, stdout, stderr = run(t, "list", "--store", dir, "--json")
	if code != 0 {
		t.Fatalf("list --json: exit %d, %s", code, stderr)
	}
	var gens []map[string]any
	if err := json.Unmarshal([]byte(stdout), &gens); err != nil {
		t.Fatalf("list --json output %q: %v", stdout, err)
	}
	if len(gens) != 2 {
		t.Fatalf("list --json listed %d generations, want 2: %s", len(gens), stdout)
	}
	for i, g := range gens {
		if g["generation"] != float64(i+1) || g["root_pid"] != float64(777) || g["processes"] != float64(2) ||
			g["raw_bytes"] != float64(len(data)) || g["intact"] != true || g["created"] == nil || g["stored_bytes"] == nil {
			t.Errorf("list --json entry %d = %v", i, g)
		}
	}
	if code, stdout, _ = run(t, "verify", "--store", dir); code != 0 || strings.Count(stdout, "intact") != 2 {
		t.Errorf("verify of an intact store: exit %d, %q", code, stdout)
	}

	// Flip one byte of the second chunk: verify names it; list, which only
	// checks sizes, still calls it intact.
	bad := m.Files[0].Chunks[1]
	packs, err := s.Packs()
	if err != nil || len(packs) != 1 {
		t.Fatalf("packs: %v, %v", packs, err)
	}
	p := packs[0].Path
	b, _ := os.ReadFile(p)
	for _, r := range packs[0].Records {
		if r.Hash == bad.Hash && r.Kind != "digests" {
			b[r.Offset+r.Len-3] ^= 0x40
		}
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr = run(t, "verify", "--store", dir)
	if code != cli.ExitFailed || !strings.Contains(stdout, "pages-1.img: chunk 1") || !strings.Contains(stdout, p) ||
		!strings.Contains(stderr, "2 of 2 generations are damaged") {
		t.Errorf("verify of a damaged chunk: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
	}
	code, stdout, _ = run(t, "verify", "--store", dir, "--generation", "1", "--json")
	var vr []map[string]any
	if err := json.Unmarshal([]byte(stdout), &vr); err != nil || code != cli.ExitFailed || len(vr) != 1 || vr[0]["intact"] != false {
		t.Errorf("verify --generation 1 --json: exit %d, %q (%v)", code, stdout, err)
	}

	// Remove its pack: now list sees it too.
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if code, stdout, _ = run(t, "list", "--store", dir); code != 0 || strings.Count(stdout, "BROKEN") != 2 || !strings.Contains(stdout, "missing") {
		t.Errorf("list with a missing chunk: exit %d\n%s", code, stdout)
	}

	// A truncated manifest: list and verify name it.
	mp := filepath.Join(s.GenDir(2), "manifest.json")
	mb, _ := os.ReadFile(mp)
	if err := os.WriteFile(mp, mb[:len(mb)/3], 0o600); err != nil {
		t.Fatal(err)
	}
	if code, stdout, _ = run(t, "verify", "--store", dir, "--generation", "2"); code != cli.ExitFailed || !strings.Contains(stdout, mp) {
		t.Errorf("verify of a truncated manifest: exit %d, %q; want 1 naming %s", code, stdout, mp)
	}
	if code, stdout, _ = run(t, "list", "--store", dir, "--json"); code != 0 || !strings.Contains(stdout, "manifest.json") {
		t.Errorf("list of a truncated manifest: exit %d, %q", code, stdout)
	}
}

func TestGCCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	junk := filepath.Join(dir, "staging", "gen-1234")
	if err := os.MkdirAll(junk, 0o700); err != nil {
		t.Fatal(err)
	}
	// A pack a killed writer left unfinished, and one that holds nothing
	// readable.
	tmp := filepath.Join(dir, "packs", strings.Repeat("ab", 16)+".tmp")
	orphan := filepath.Join(dir, "packs", strings.Repeat("cd", 16)+".pack")
	for _, p := range []string{tmp, orphan} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_ = s
	code, stdout, stderr := run(t, "gc", "--store", dir, "--json")
	var res map[string]any
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || code != 0 || res["packs_removed"] != float64(1) {
		t.Errorf("gc --json: exit %d, %q, %q (%v)", code, stdout, stderr, err)
	}
	for _, p := range []string{junk, tmp, orphan} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("gc left %s", p)
		}
	}
}

// freePID returns a PID no process holds right now.
func freePID(t *testing.T) int {
	t.Helper()
	for pid := 4_000_000; pid > 1000; pid -= 7919 {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
			return pid
		}
	}
	t.Fatal("no free pid found")
	return 0
}

// storeWithGeneration makes a store holding one generation of a 3 MiB
// pages file, without CRIU.
func storeWithGeneration(t *testing.T) (dir string, s *store.Store) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "store")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "pages-1.img")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := s.NewWriter()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), []store.FileSpec{{Path: img, Name: "pages-1.img", Kind: "pages"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(&store.Manifest{Job: store.Job{RootPID: 777, Processes: []store.Process{{PID: 777}}}}); err != nil {
		t.Fatal(err)
	}
	return dir, s
}

// TestRestoreJSONError: a failed restore with --json prints one JSON
// error object on stdout that a script can branch on, and the one-line
// message on stderr.
func TestRestoreJSONError(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-store")
	empty := filepath.Join(t.TempDir(), "empty")
	if _, err := store.Create(empty, "cryo test"); err != nil {
		t.Fatal(err)
	}
	damaged, s := storeWithGeneration(t)
	mp := filepath.Join(s.GenDir(1), "manifest.json")
	mb, _ := os.ReadFile(mp)
	if err := os.WriteFile(mp, mb[:len(mb)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		args  []string
		code  string
		exit  int
		names string // in the error
	}{
		{"missing store", []string{"--store", missing}, "no_store", cli.ExitFailed, missing},
		{"empty store", []string{"--store", empty}, "no_generation", cli.ExitFailed, "no checkpoints"},
		{"no such generation", []string{"--store", empty, "--generation", "3"}, "no_generation", cli.ExitFailed, "no such generation"},
		{"damaged manifest", []string{"--store", damaged}, "corrupt", cli.ExitFailed, "--fallback"},
		{"bad device map", []string{"--store", damaged, "--device-map", "nonsense"}, "usage", cli.ExitUsage, "--device-map"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := run(t, append([]string{"restore", "--json", "--criu=/bin/true"}, tc.args...)...)
			var je struct {
				Error    string `json:"error"`
				Code     string `json:"code"`
				ExitCode int    `json:"exit_code"`
			}
			dec := json.NewDecoder(strings.NewReader(stdout))
			if err := dec.Decode(&je); err != nil || dec.More() {
				t.Fatalf("stdout is not one JSON object (%v): %q", err, stdout)
			}
			if code != tc.exit || je.ExitCode != tc.exit || je.Code != tc.code || !strings.Contains(je.Error, tc.names) {
				t.Errorf("exit %d, error object %+v; want exit %d, code %q, an error naming %q", code, je, tc.exit, tc.code, tc.names)
			}
			if lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n"); len(lines) != 1 || !strings.HasPrefix(stderr, "cryo: ") || !strings.Contains(stderr, je.Error) {
				t.Errorf("stderr %q: want the one-line message", stderr)
			}
		})
	}
	// Without --json, stdout stays empty.
	if code, stdout, _ := run(t, "restore", "--criu=/bin/true", "--store", missing); code != cli.ExitFailed || stdout != "" {
		t.Errorf("restore without --json: exit %d, stdout %q", code, stdout)
	}
}

// TestBadInput: each mistake in how a command is called is refused with
// exit 2 and one line naming what is wrong, before anything is done.
func TestBadInput(t *testing.T) {
	dir, _ := storeWithGeneration(t)
	missing := filepath.Join(t.TempDir(), "no-such-store")
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"verify", "--store", dir, "--generation", "-2"}, "--generation"},
		{[]string{"inspect", "--store", dir, "--generation", "-1"}, "--generation"},
		{[]string{"inspect", "--store", dir, "extra"}, "no arguments"},
		{[]string{"repair", "--store", dir, "--replica", dir}, "--replica is the store itself"},
		{[]string{"repair", "--store", dir, "--replica", dir + "/", "--json"}, "--replica is the store itself"},
		{[]string{"repair", "--store", dir, "--replica", dir, "--generation", "-1"}, "--generation"},
		{[]string{"repair", "--store", dir}, "replica"},
		{[]string{"gc", "--store", dir, "--keep", "-1"}, "--keep"},
		{[]string{"gc", "--store", dir, "--lock-wait", "0s"}, "--lock-wait"},
		{[]string{"recover", "--store", dir, "extra"}, "no arguments"},
		{[]string{"gpus", "extra"}, "no arguments"},
		{[]string{"checkpoint", "--store", dir, "--replica-required", "1"}, "--replica-required needs --replica"},
		{[]string{"restore", "--store", dir, "--device-map", "a=b=c"}, "--device-map"},
		{[]string{"swap-out", "--store", missing, "notapid"}, "give the PID"},
		{[]string{"swap-out", "--store", missing, "1", "2"}, "at most one JOB"},
		{[]string{"slurm", "prolog", "extra"}, "no arguments"},
	} {
		code, stdout, stderr := run(t, tc.args...)
		lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
		if code != cli.ExitUsage || !strings.Contains(stderr, tc.msg) || len(lines) != 1 || !strings.HasPrefix(stderr, "cryo: ") {
			t.Errorf("cryo %s: exit %d, stderr %q; want exit 2 and one line naming %q", strings.Join(tc.args, " "), code, stderr, tc.msg)
		}
		if !strings.Contains(strings.Join(tc.args, " "), "--json") && stdout != "" && !strings.Contains(stdout, "USAGE") {
			t.Errorf("cryo %s: printed %q", strings.Join(tc.args, " "), stdout)
		}
	}
}

// TestFailuresAreOneLine: failed operations exit 1 with one line that
// names the store.
func TestFailuresAreOneLine(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-store")
	other := filepath.Join(t.TempDir(), "other")
	for _, args := range [][]string{
		{"list", "--store", missing},
		{"verify", "--store", missing},
		{"inspect", "--store", missing},
		{"gc", "--store", missing},
		{"recover", "--store", missing},
		{"repair", "--store", missing, "--replica", other},
	} {
		code, stdout, stderr := run(t, args...)
		lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
		if code != cli.ExitFailed || stdout != "" || len(lines) != 1 || !strings.Contains(stderr, missing) {
			t.Errorf("cryo %s: exit %d, stdout %q, stderr %q; want exit 1 and one line naming %s", strings.Join(args, " "), code, stdout, stderr, missing)
		}
	}
}

// TestSizesInMiB: every command prints sizes the same way.
func TestSizesInMiB(t *testing.T) {
	dir, _ := storeWithGeneration(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "--store", dir}, " 3.0 MiB "},
		{[]string{"inspect", "--store", dir, "--files"}, "storage: 3.0 MiB of images"},
		{[]string{"gc", "--store", dir}, "(0.0 MiB)"},
	} {
		code, stdout, stderr := run(t, tc.args...)
		if code != 0 || !strings.Contains(stdout, tc.want) {
			t.Errorf("cryo %s: exit %d, %q, %q; want %q", strings.Join(tc.args, " "), code, stdout, stderr, tc.want)
		}
		for _, unit := range []string{" KiB", " GiB", " B)", " B "} {
			if strings.Contains(stdout, unit) {
				t.Errorf("cryo %s uses %q:\n%s", strings.Join(tc.args, " "), unit, stdout)
			}
		}
	}
}
