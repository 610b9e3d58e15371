package monitor

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestDalyInterval(t *testing.T) {
	cases := []struct {
		delta, mtbf time.Duration
		want        time.Duration // ±1%
	}{
		// δ=60 s, M=24 h: sqrt(2·60·86400)=3220 s; Daly's correction terms
		// add ~1.4% and subtract δ.
		{60 * time.Second, 24 * time.Hour, 3205 * time.Second},
		// A checkpoint costing more than 2M: checkpoint every M.
		{3 * time.Hour, time.Hour, time.Hour},
		{0, time.Hour, 0},
	}
	for _, tc := range cases {
		got := DalyInterval(tc.delta, tc.mtbf)
		if math.Abs(float64(got-tc.want)) > 0.01*float64(tc.want)+float64(time.Millisecond) {
			t.Errorf("DalyInterval(%v, %v) = %v, want about %v", tc.delta, tc.mtbf, got, tc.want)
		}
	}
	// Young's first order term, and Daly's estimate stays close to it for
	// small costs.
	y := YoungInterval(time.Second, 24*time.Hour)
	if want := time.Duration(math.Sqrt(2*86400) * float64(time.Second)); y != want {
		t.Errorf("YoungInterval = %v, want %v", y, want)
	}
	if d := DalyInterval(time.Second, 24*time.Hour); d < y-2*time.Second || d > y+2*time.Second {
		t.Errorf("Daly %v strays from Young %v for a tiny cost", d, y)
	}
}

func TestCostEstimateSmooths(t *testing.T) {
	var c costEstimate
	c.add(time.Second)
	c.add(time.Second)
	c.add(11 * time.Second) // one slow checkpoint
	if c.avg < 2*time.Second || c.avg > 5*time.Second {
		t.Errorf("avg after one outlier = %v, want between 2 s and 5 s", c.avg)
	}
}

func TestGrowthFit(t *testing.T) {
	t0 := time.Now()
	var ts []time.Time
	var vs []float64
	for i := 0; i < 10; i++ {
		ts = append(ts, t0.Add(time.Duration(i)*10*time.Second))
		vs = append(vs, 1e9+float64(i)*5e6) // 5 MB per 10 s
	}
	slope, r2 := growth(ts, vs)
	if math.Abs(slope-5e5) > 1 || r2 < 0.999 {
		t.Errorf("steady growth: slope %v r2 %v, want 5e5 B/s and r2≈1", slope, r2)
	}
	flat := []float64{1, 3, 1, 3, 1, 3, 1, 3, 1, 3}
	if _, r2 := growth(ts, flat); r2 > 0.2 {
		t.Errorf("noise fitted with r2 %v", r2)
	}
}

func TestMetricsExposition(t *testing.T) {
	m := &Metrics{}
	m.Checkpoint("j1", 2*time.Second, 100*time.Millisecond, 1000, 200)
	m.CheckpointFailed("j1")
	m.Restore("j1", true)
	m.Failure("j1", "channel")
	m.Failure("j1", "channel")
	var b strings.Builder
	m.WriteTo(&b)
	out := b.String()
	for _, want := range []string{
		"# TYPE cryo_checkpoints_total counter",
		`cryo_checkpoints_total{job="j1"} 1`,
		`cryo_checkpoint_failures_total{job="j1"} 1`,
		`cryo_checkpoint_duration_seconds_sum{job="j1"} 2`,
		`cryo_checkpoint_bytes_total{job="j1"} 1000`,
		`cryo_restores_total{job="j1"} 1`,
		`cryo_failures_detected_total{job="j1",kind="channel"} 2`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q:\n%s", want, out)
		}
	}
	var nilM *Metrics
	nilM.Checkpoint("x", 0, 0, 0, 0) // a nil *Metrics records nothing, and does not panic
}

func TestControlAnswers(t *testing.T) {
	s, err := New(Config{Name: "j", Store: t.TempDir(), Trees: []TreeSpec{{Name: "host", Argv: []string{"true"}, Host: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if resp := answer(ctx, s, Request{Op: "status"}); !resp.OK || len(resp.Jobs) != 1 || resp.Jobs[0].Name != "j" {
		t.Errorf("status: %+v", resp)
	}
	if resp := answer(ctx, s, Request{Op: "status", Job: "other"}); resp.OK {
		t.Errorf("status of another job: %+v", resp)
	}
	if resp := answer(ctx, s, Request{Op: "run"}); resp.OK || !strings.Contains(resp.Error, "unknown op") {
		t.Errorf("a job submission (no daemon any more): %+v", resp)
	}
}

// The control socket is the owner's and root's: 0600, and each peer is
// checked by SO_PEERCRED (here, ourselves).
func TestControlSocketIsTheOwners(t *testing.T) {
	s, err := New(Config{Name: "j", Store: t.TempDir(), Trees: []TreeSpec{{Name: "host", Argv: []string{"true"}, Host: true}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "c.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ServeControl(ctx, path, s, nil)
	for i := 0; i < 100; i++ {
		if st, err := os.Stat(path); err == nil && st.Mode().Perm() == 0o600 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, mode %v; want 0600", err, st.Mode())
	}
	resp, err := Call(ctx, path, Request{Op: "status"})
	if err != nil || !resp.OK {
		t.Fatalf("the owner was refused: %v", err)
	}
	// A file in the socket's place that is not a socket is left alone.
	other := filepath.Join(t.TempDir(), "not-a-socket")
	os.WriteFile(other, []byte("x"), 0o600)
	if err := ServeControl(ctx, other, s, nil); err == nil {
		t.Error("ServeControl replaced a regular file")
	}
	if b, _ := os.ReadFile(other); string(b) != "x" {
		t.Error("the file was changed")
	}
}

func TestSocketsSeeABrokenUnixChannel(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fds[0])
	inos := socketInodes([]int{os.Getpid()})
	us, err := unixSockets(inos)
	if err != nil {
		t.Skipf("sock_diag unavailable here: %v", err)
	}
	var a, b uint64
	for ino, si := range us {
		if si.peer != 0 && us[si.peer].peer == ino {
			a, b = ino, si.peer
		}
	}
	if a == 0 {
		t.Fatal("the socketpair was not found with its peer")
	}
	syscall.Close(fds[1])
	us, _ = unixSockets(socketInodes([]int{os.Getpid()}))
	alive := us[a]
	if alive.ino == 0 {
		alive = us[b]
	}
	if alive.shutdown == 0 {
		t.Errorf("the end whose peer closed shows shutdown %d, want non-zero", alive.shutdown)
	}
}

// Checkpoints taken while a job is silent delay its timeout by the time
// they held it still, and no more: they must never keep resetting it.
func TestQuietForSubtractsOnlyStillness(t *testing.T) {
	s := &Supervisor{}
	now := time.Now()
	beat := now.Add(-10 * time.Second)
	// Ten checkpoints of 100 ms since the last beat.
	for i := 1; i <= 10; i++ {
		from := beat.Add(time.Duration(i) * 900 * time.Millisecond)
		s.stood(from, from.Add(100*time.Millisecond))
	}
	got := s.quietFor(beat)
	if got < 8900*time.Millisecond || got > 9100*time.Millisecond {
		t.Errorf("quietFor = %v, want about 9 s (10 s less 1 s of checkpoints)", got)
	}
	// A checkpoint that began before the beat counts only after it.
	s2 := &Supervisor{}
	s2.stood(beat.Add(-time.Second), beat.Add(500*time.Millisecond))
	if got := s2.quietFor(beat); got < 9400*time.Millisecond || got > 9600*time.Millisecond {
		t.Errorf("quietFor = %v, want about 9.5 s", got)
	}
}

// Before a scheduled checkpoint the job's health is judged on fresh
// readings. The detectors look once a second, so their last look alone
// would make a job that beats, or computes, steadily look late, and the
// checkpoint would be put off until after a failure it could have
// preceded (CI saw exactly that).
func TestUnwellJudgesFreshReadings(t *testing.T) {
	store := t.TempDir()
	if err := os.MkdirAll(RunDir(store), 0o700); err != nil {
		t.Fatal(err)
	}
	hb := filepath.Join(RunDir(store), "heartbeat")
	if err := os.WriteFile(hb, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	start := func(script string) int {
		cmd := exec.Command("/bin/sh", "-c", script)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd.Process.Pid
	}
	busy, idle := start("while :; do :; done"), start("exec sleep 60")
	for deadline := time.Now().Add(10 * time.Second); cpuTicks([]int{busy}) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("a busy loop used no CPU time in 10 s")
		}
	}
	stale := time.Now().Add(-1500 * time.Millisecond)
	s := &Supervisor{cfg: Config{Store: store, HeartbeatTimeout: 2 * time.Second, HangTimeout: 3 * time.Second}, seen: map[int]uint64{}, sessions: map[int]bool{}}
	s.beat.reset(hb, stale)
	// The job beats after the last look, 1.5 s ago.
	beat := time.Now().Add(time.Second)
	if err := os.Chtimes(hb, beat, beat); err != nil {
		t.Fatal(err)
	}
	s.roots = map[int]string{busy: "busy"}
	s.hang = map[string]hangMark{"busy": {pids: []int{busy}, since: stale, progress: stale, sampled: stale}}
	if why := s.unwell(); why != "" {
		t.Errorf("a job that beat just now and computes: unwell says %q", why)
	}

	// Really late: the file has not changed since a look 1.5 s ago.
	s.beat.reset(hb, stale)
	if why := s.unwell(); why != "the heartbeat is late" {
		t.Errorf("heartbeat 1.5 s old with a 2 s timeout: unwell says %q, want the heartbeat is late", why)
	}

	// Really idle: an offload tree whose CPU time has not moved.
	beat = beat.Add(time.Second)
	if err := os.Chtimes(hb, beat, beat); err != nil {
		t.Fatal(err)
	}
	s.roots = map[int]string{idle: "idle"}
	s.hang = map[string]hangMark{"idle": {pids: []int{idle}, ticks: cpuTicks([]int{idle}), since: stale, progress: stale, sampled: stale}}
	if why := s.unwell(); !strings.Contains(why, "offload tree idle has made no CPU progress") {
		t.Errorf("an idle tree for 1.5 s with a 3 s timeout: unwell says %q", why)
	}
}
