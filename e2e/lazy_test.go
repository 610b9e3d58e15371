package e2e

import (
	"encoding/json"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// A lazy restore starts the job before its memory is back; the job still
// finishes with the uninterrupted run's result, and every lazy page is
// served exactly once.
func TestLazyRestore(t *testing.T) {
	criu := requireCRIU(t)
	args := []string{"-steps", "60", "-mem", "64"}
	want := reference(t, "memstate", args...)
	dir := t.TempDir()
	st, out := filepath.Join(dir, "store"), filepath.Join(dir, "job.out")
	j := startJob(t, "memstate", out, false, append(args, "-delay", "50ms")...)
	waitStep(t, out, 10, 30*time.Second)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	at := readProgress(t, out).last()
	killAtEnd(t, j.pid)

	r := cryo(t, criu, "restore", "--store", st, "--lazy", "--json")
	if r.code != 0 {
		t.Fatalf("restore --lazy: %s", r)
	}
	var res struct {
		PID        int   `json:"pid"`
		LazyBytes  int64 `json:"lazy_bytes"`
		LazyServed int64 `json:"lazy_served"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("restore --lazy --json printed %q: %v", r.stdout, err)
	}
	if res.PID != j.pid {
		t.Errorf("restored pid %d, want %d", res.PID, j.pid)
	}
	// The 64 MiB buffer is private anonymous memory: it must have been
	// left out of the images and served afterwards, all of it.
	if res.LazyBytes < 64<<20 {
		t.Errorf("only %d bytes were left to lazy service, want at least the 64 MiB buffer", res.LazyBytes)
	}
	if res.LazyServed != res.LazyBytes {
		t.Errorf("served %d bytes of %d lazy ones", res.LazyServed, res.LazyBytes)
	}
	waitEnded(t, time.Minute, j.pid)
	p := readProgress(t, out)
	checkRun(t, "lazily restored job", p.steps, 1, 60)
	if p.result != want {
		t.Errorf("lazily restored job printed %q, want %q (checkpointed at step %d)", p.result, want, at)
	}
}
