package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Two trees that do not share a root — a host and an offload worker started
// separately, talking over TCP — are frozen together, dumped one by one
// into one generation, and restored together: the connection comes back
// with what was in flight and the host finishes with the reference result.
func TestMultiTreeCheckpointKeepsTheChannel(t *testing.T) {
	criu := requireCRIU(t)
	buildOffload(t)
	t.Setenv("GODEBUG", "multipathtcp=0") // CRIU cannot dump MPTCP sockets
	const items = 120
	want := offloadReference(t, items)
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	w := startJob(t, "offload", filepath.Join(dir, "worker.out"), false, "-role", "worker", "-addr", addr)
	out := filepath.Join(dir, "host.out")
	h := startJob(t, "offload", out, false, "-role", "host", "-addr", addr, "-items", strconv.Itoa(items), "-delay", "25ms")
	waitStep(t, out, 20, 30*time.Second)

	st := filepath.Join(dir, "store")
	r := cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(h.pid), strconv.Itoa(w.pid))
	if r.code != 0 {
		t.Fatalf("checkpoint of two trees: %s", r)
	}
	h.waitExit(t, 10*time.Second)
	w.waitExit(t, 10*time.Second)
	at := readProgress(t, out).last()
	m := manifest(t, st, 1)
	if len(m.Job.Trees) != 2 || len(m.Job.Processes) != 2 {
		t.Fatalf("manifest: trees %v, %d processes; want 2 trees of one process each", m.Job.Trees, len(m.Job.Processes))
	}
	killAtEnd(t, h.pid, w.pid)

	r = cryo(t, criu, "restore", "--store", st)
	if r.code != 0 {
		t.Fatalf("restore of two trees: %s", r)
	}
	if strings.TrimSpace(r.stdout) != strconv.Itoa(h.pid) {
		t.Errorf("restore printed %q, want the first tree's pid %d", r.stdout, h.pid)
	}
	waitEnded(t, time.Minute, h.pid)
	p := readProgress(t, out)
	checkRun(t, "host across a two-tree checkpoint", p.steps, 1, items)
	if "result "+p.result != want {
		t.Errorf("host result %q, want %q (checkpointed at item %d)", p.result, want, at)
	}
}
