package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseSignal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want syscall.Signal
		err  bool
	}{
		{"USR1", syscall.SIGUSR1, false},
		{"SIGUSR2", syscall.SIGUSR2, false},
		{"usr2", syscall.SIGUSR2, false},
		{"12", syscall.SIGUSR2, false},
		{"HUP", syscall.SIGHUP, false},
		{"KILL", 0, true},
		{"TERM", 0, true}, // already means checkpoint and stop
		{"NOPE", 0, true},
		{"0", 0, true},
	} {
		got, err := parseSignal(tc.in)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("parseSignal(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestBatchShellDrops runs a shell as Slurm runs a batch script (a file
// named slurm_script), with and without a trap for SIGUSR1.
func TestBatchShellDrops(t *testing.T) {
	sh, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	for _, tc := range []struct {
		script string
		drops  bool
	}{
		{"sleep 30", true},
		{"trap 'echo got it' USR1; sleep 30", false},
		{"trap '' USR1; sleep 30", false},
	} {
		dir := t.TempDir()
		path := filepath.Join(dir, "slurm_script")
		if err := os.WriteFile(path, []byte("#!/bin/bash\n"+tc.script+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(sh, path)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Until bash has read the script its trap is not set: poll.
		var got bool
		for range 100 {
			got = batchShellDrops(cmd.Process.Pid, syscall.SIGUSR1)
			if got == tc.drops {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		cmd.Process.Kill()
		cmd.Wait()
		if got != tc.drops {
			t.Errorf("%q: batchShellDrops = %v, want %v", tc.script, got, tc.drops)
		}
	}
	// Not a batch script at all.
	if batchShellDrops(os.Getpid(), syscall.SIGUSR1) {
		t.Errorf("the test binary was taken for a batch script")
	}
}

func TestRunNeedsStoreOutsideSlurm(t *testing.T) {
	t.Setenv("SLURM_JOB_ID", "")
	t.Setenv("CRYO_STORE", "")
	var out, errb bytes.Buffer
	code := Main(t.Context(), []string{"cryo", "run", "--", "true"}, &out, &errb)
	if code != ExitUsage || !strings.Contains(errb.String(), "needs --store") {
		t.Errorf("cryo run without --store outside Slurm: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	code = Main(t.Context(), []string{"cryo", "run", "--requeue", "--store", t.TempDir(), "--", "true"}, &out, &errb)
	if code != ExitUsage || !strings.Contains(errb.String(), "--requeue needs a Slurm batch job") {
		t.Errorf("cryo run --requeue outside Slurm: exit %d, %q", code, errb.String())
	}
}
