package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// mixedJob is the bench's workload at test size: random, zero,
// numeric and text memory, whose SHA-256 it writes to a file when ready
// and again on SIGUSR1.
type mixedJob struct {
	*job
	digest string
}

func startMixed(t *testing.T, dir string, mib int) *mixedJob {
	t.Helper()
	d := filepath.Join(dir, "digest")
	j := &mixedJob{startJob(t, "mixed", filepath.Join(dir, "mixed.out"), false, "-mib", strconv.Itoa(mib), "-digest", d), d}
	j.waitDigest(t, time.Time{})
	return j
}

// waitDigest waits for a digest written after since and returns it.
func (j *mixedJob) waitDigest(t *testing.T, since time.Time) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(j.digest); err == nil && st.ModTime().After(since) {
			if b, err := os.ReadFile(j.digest); err == nil && len(strings.TrimSpace(string(b))) == 64 {
				return strings.TrimSpace(string(b))
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the mixed workload wrote no digest after %v", since)
	return ""
}

// rehash asks the (restored) job to hash its memory again.
func (j *mixedJob) rehash(t *testing.T) string {
	t.Helper()
	since := time.Now()
	time.Sleep(10 * time.Millisecond) // a later mtime, even on coarse clocks
	if err := syscall.Kill(j.pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("signal the restored job: %v", err)
	}
	return j.waitDigest(t, since)
}

func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// TestStreamedRestore: by default a restore streams the images from the
// store into CRIU and leaves zero memory out; the job's memory comes back
// bit for bit (its own SHA-256 over all of it), holding less RSS by about
// the zero memory left out. Restored again with --no-stream (images
// materialized in the work directory), the same memory comes back with
// the zeros in it.
func TestStreamedRestore(t *testing.T) {
	criu := requireCRIU(t)
	dir := t.TempDir()
	st := filepath.Join(dir, "store")
	j := startMixed(t, dir, 48)
	want := j.waitDigest(t, time.Time{})
	rssBefore := rssKiB(t, j.pid)
	if r := cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
		t.Fatalf("checkpoint --kill: %s", r)
	}
	j.waitExit(t, 10*time.Second)
	killAtEnd(t, j.pid)

	type restored struct {
		PID         int   `json:"pid"`
		Streamed    bool  `json:"streamed"`
		ZeroLeftOut int64 `json:"zero_left_out"`
	}
	for _, tc := range []struct {
		name   string
		args   []string
		stream bool
	}{
		{"streamed", nil, true},
		{"materialized", []string{"--no-stream"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cryo(t, criu, append([]string{"restore", "--store", st, "--json"}, tc.args...)...)
			if r.code != 0 {
				t.Fatalf("restore: %s", r)
			}
			var res restored
			if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.PID != j.pid {
				t.Fatalf("restore --json: pid %d, want %d (%v)\n%s", res.PID, j.pid, err, r)
			}
			if res.Streamed != tc.stream {
				t.Errorf("streamed = %v, want %v", res.Streamed, tc.stream)
			}
			// 3 of every 10 MiB of the workload are zero.
			if tc.stream && res.ZeroLeftOut < 12<<20 {
				t.Errorf("a streamed restore left out %d bytes of zero memory, want >= 12 MiB of the 14 MiB", res.ZeroLeftOut)
			}
			if !tc.stream && res.ZeroLeftOut != 0 {
				t.Errorf("a materialized restore reports %d bytes of zero memory left out", res.ZeroLeftOut)
			}
			rss := rssKiB(t, j.pid)
			if got := j.rehash(t); got != want {
				t.Fatalf("restored memory hashes to %s, before the checkpoint %s", got, want)
			}
			if tc.stream && int64(rss) > int64(rssBefore)-res.ZeroLeftOut/1024/2 {
				t.Errorf("restored job holds %d KiB, before %d KiB: the %d KiB of zeros left out should not be there", rss, rssBefore, res.ZeroLeftOut/1024)
			}
			if err := syscall.Kill(j.pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			waitEnded(t, 10*time.Second, j.pid)
		})
	}
}
