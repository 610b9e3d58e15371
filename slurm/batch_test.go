package slurm

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

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
			got = BatchShellDrops(cmd.Process.Pid, syscall.SIGUSR1)
			if got == tc.drops {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		cmd.Process.Kill()
		cmd.Wait()
		if got != tc.drops {
			t.Errorf("%q: BatchShellDrops = %v, want %v", tc.script, got, tc.drops)
		}
	}
	// Not a batch script at all.
	if BatchShellDrops(os.Getpid(), syscall.SIGUSR1) {
		t.Errorf("the test binary was taken for a batch script")
	}
}
