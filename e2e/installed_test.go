package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
)

// TestUserWithTheInstalledLayout is what a user has after an admin's
// `make install`: PREFIX/bin/cryo and its CRIU (with its file capability)
// in PREFIX/lib/cryo/criu, nothing in the environment. cryo finds that
// CRIU by itself, `cryo check` says so, and a checkpoint and restore of
// the user's job work with nothing else.
func TestUserWithTheInstalledLayout(t *testing.T) {
	installedCRIU, u := requireUser(t)
	prefix, err := os.MkdirTemp("", "cryo-prefix-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(prefix) })
	self := filepath.Join(prefix, "bin", "cryo")
	ours := filepath.Clean(filepath.Join(filepath.Dir(self), criu.InstalledRel))
	for _, d := range []string{prefix, filepath.Dir(self), filepath.Dir(ours)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range [][]string{
		{"install", "-m", "0755", bin("cryo"), self},
		// The copy keeps CRIU's file capability (an extended attribute).
		{"cp", "--preserve=mode,xattr", installedCRIU, ours},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	run := func(args ...string) cryoResult {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, self, args...)
		u.as(cmd) // a clean environment: no CRYO_CRIU
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		return runCryo(t, cmd, &out, &errb, append([]string{"(installed, as " + u.name + ")"}, args...))
	}
	r := run("check", "--json")
	var chk struct {
		Path   string `json:"path"`
		Source string `json:"found_via"`
		OK     bool   `json:"ok"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &chk) != nil {
		t.Fatalf("cryo check: %s", r)
	}
	if chk.Path != ours || chk.Source != "the cryo installation" || !chk.OK {
		t.Fatalf("cryo check found %+v, want the CRIU installed beside it (%s), usable", chk, ours)
	}

	w := killRestoreCases[0] // memstate
	want := reference(t, w.name, w.args(t.TempDir())...)
	dir := u.dir(t)
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := u.startJob(t, w.name, out, append(w.args(dir), "-delay", jobDelay)...)
	waitStep(t, out, stepFirst, 30*time.Second)
	if r := run("checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("checkpoint with the installed cryo: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	r = run("restore", "--store", st)
	pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if r.code != 0 || err != nil {
		t.Fatalf("restore with the installed cryo: %s", r)
	}
	waitEnded(t, time.Minute, pid)
	if p := readProgress(t, out); p.result != want {
		t.Errorf("the restored job finished with %q, want %q (an uninterrupted run's)", p.result, want)
	}
}
