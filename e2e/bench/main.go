// Command bench compares cryo with raw CRIU on the same workload in the same
// run: `criu dump` against `cryo checkpoint --kill`, `criu restore -d`
// against `cryo restore`, the bytes each leaves on disk, and the bytes a
// second cryo generation adds after the job changed about 5% of its memory.
//
// It is run by scripts/bench.sh (make bench), which builds it and the
// workload (e2e/workloads/mixed). Every timed step starts from the same
// condition for every tool: dirty pages synced, page caches dropped, and a
// few GiB of fresh memory touched and freed just before, because these
// VMs hand freed memory back to the host and touching it again is slow.
// Tools alternate which goes first from one repetition to the next.
//
// Every restore is checked: the restored workload hashes its memory again
// and the digest must equal the one taken before the checkpoint. The bench
// kills every workload it started or restored and removes its directories,
// also when it fails or is interrupted.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"golang.org/x/sys/unix"
)

// Targets are the ratios cryo aims for (medians), those of the storage
// engine's issue: checkpoint until durable against raw criu dump + fsync
// of its images, bytes stored against the raw images, the job's frozen
// time (leave-running) against raw criu dump's, the second generation's
// new bytes against the first generation's raw size, restore against
// criu restore, and a lazy restore's time to a running job against a full
// criu restore.
const (
	targetDurable   = 1.0
	targetBytes     = 0.26
	targetFrozen    = 1.0
	targetGen2      = 0.08
	targetRestore   = 1.0
	targetLazyStart = 0.2
)

type config struct {
	Cryo     string `json:"cryo"`
	CRIU     string `json:"criu"`
	Workload string `json:"workload"`
	Dir      string `json:"dir"`     // on the disk of the store: CRIU images and cryo stores
	ShmDir   string `json:"shm_dir"` // RAM-backed: cryo's --work-dir
	MiB      int    `json:"mib"`
	Reps     int    `json:"reps"`
	WarmMiB  int    `json:"warm_mib"`
	// Settle is how long the machine idles before each timed step (after
	// the caches are dropped, before any warm-up). With no warm-up it
	// gives a "cold" bench: freed memory has gone back to the host, and
	// every tool pays for fresh memory, as after a quiet spell on a VM.
	Settle  time.Duration `json:"settle_ns"`
	JSONOut string        `json:"-"`
}

func main() {
	var c config
	flag.StringVar(&c.Cryo, "cryo", "bin/cryo", "cryo binary")
	flag.StringVar(&c.CRIU, "criu", envOr("CRYO_CRIU", "criu"), "CRIU binary, used raw and by cryo")
	flag.StringVar(&c.Workload, "workload", "", "the mixed workload binary (required)")
	flag.StringVar(&c.Dir, "dir", "", "directory on the store's disk for images and stores (required; the bench removes what it makes there)")
	flag.StringVar(&c.ShmDir, "shm", "", "RAM-backed directory for cryo's work dirs (required)")
	flag.IntVar(&c.MiB, "mib", envInt("BENCH_MIB", 2048), "MiB of workload memory")
	flag.IntVar(&c.Reps, "reps", envInt("BENCH_REPS", 3), "repetitions per tool")
	flag.IntVar(&c.WarmMiB, "warm-mib", envInt("BENCH_WARM_MIB", -1), "MiB of fresh memory touched and freed before each timed step (-1: 2*mib+512, at least 2048)")
	flag.DurationVar(&c.Settle, "settle", envDuration("BENCH_SETTLE", 0), "idle this long before each timed step (with -warm-mib 0: a cold bench)")
	flag.StringVar(&c.JSONOut, "json", "", "write the results as JSON here (required)")
	flag.Parse()
	if c.WarmMiB < 0 {
		// Enough for the largest need of one step: cryo restore holds the
		// materialized images and the restored job at once.
		c.WarmMiB = max(2048, 2*c.MiB+512)
	}
	if c.Workload == "" || c.Dir == "" || c.ShmDir == "" || c.JSONOut == "" || c.MiB <= 0 || c.Reps <= 0 {
		fmt.Fprintln(os.Stderr, "bench: -workload, -dir, -shm and -json are required; -mib and -reps must be > 0")
		os.Exit(2)
	}
	for _, p := range []*string{&c.Cryo, &c.CRIU, &c.Workload} {
		abs, err := exec.LookPath(*p)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			os.Exit(2)
		}
		*p, _ = filepath.Abs(abs)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b := &bench{cfg: c, ctx: ctx, procs: map[int]chan struct{}{}}
	err := b.run()
	if cerr := b.cleanup(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: FAILED: %v\n", err)
		os.Exit(1)
	}
}

// bench holds one run's state. Workload processes it started or restored
// are tracked in procs, so that they are reaped and can be killed.
type bench struct {
	cfg   config
	ctx   context.Context
	mu    sync.Mutex
	procs map[int]chan struct{} // pid -> closed once the process is gone
	res   results
}

// results is what the JSON file holds.
type results struct {
	Started     time.Time     `json:"started"`
	Host        string        `json:"host"`
	Kernel      string        `json:"kernel"`
	CPUs        int           `json:"cpus"`
	CRIUVersion string        `json:"criu_version"`
	Config      config        `json:"config"`
	LoadBefore  string        `json:"loadavg_before"`
	LoadAfter   string        `json:"loadavg_after"`
	Digest      string        `json:"workload_digest"`
	Runs        []run         `json:"runs"`
	Incremental []incremental `json:"incremental"`
	Summary     []summaryRow  `json:"summary"`
	Ratios      []ratio       `json:"ratios"`
	WarmTouch   []int64       `json:"warm_touch_ns"` // how long each touch-and-free took
}

// run is one tool's checkpoint and restore in one repetition.
type run struct {
	Rep           int    `json:"rep"`
	Tool          string `json:"tool"` // "criu" or "cryo"
	Order         int    `json:"order"`
	CheckpointNS  int64  `json:"checkpoint_wall_ns"`
	RestoreNS     int64  `json:"restore_wall_ns"`
	DiskBytes     int64  `json:"disk_bytes"`     // allocated blocks (du)
	ApparentBytes int64  `json:"apparent_bytes"` // sum of file sizes (du -b)
	FrozenNS      int64  `json:"frozen_ns"`      // CRIU's frozen time (stats-dump; cryo reports it)
	DigestOK      bool   `json:"digest_ok"`
	// raw CRIU only
	FsyncNS int64 `json:"images_fsync_ns,omitempty"` // fsync of every image after the dump (not in the wall time)
	// cryo only
	DurableNS     int64 `json:"durable_ns,omitempty"`
	DumpNS        int64 `json:"criu_dump_in_cryo_ns,omitempty"`
	RawBytes      int64 `json:"raw_bytes,omitempty"`
	NewBytes      int64 `json:"new_bytes,omitempty"`
	MaterializeNS int64 `json:"materialize_ns,omitempty"`
	CRIURestoreNS int64 `json:"criu_restore_in_cryo_ns,omitempty"`
}

// incremental is a second cryo generation, taken leave-running after the
// restored job changed about 5% of its memory.
type incremental struct {
	Rep          int   `json:"rep"`
	WallNS       int64 `json:"wall_ns"`
	FrozenNS     int64 `json:"frozen_ns"`
	RawBytes     int64 `json:"raw_bytes"`
	NewBytes     int64 `json:"new_bytes"`
	StoreGrowth  int64 `json:"store_growth_bytes"`
	Gen1NewBytes int64 `json:"gen1_new_bytes"`
	RunningOK    bool  `json:"memory_intact_after_leave_running"`
	RestoreOK    bool  `json:"generation2_restores_intact"`
	// Generation 2 is restored with --lazy: the job runs after LazyStartNS
	// (cryo's materialize + CRIU restore), its memory is whole after
	// LazyWallNS (cryo restore --lazy returns then).
	LazyStartNS int64 `json:"lazy_start_ns"`
	LazyWallNS  int64 `json:"lazy_wall_ns"`
	LazyBytes   int64 `json:"lazy_bytes"`
}

type summaryRow struct {
	Name   string  `json:"name"`
	Unit   string  `json:"unit"` // "ns" or "bytes"
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Values []int64 `json:"values"`
}

type ratio struct {
	Name      string  `json:"name"`
	Median    float64 `json:"median"`
	Min       float64 `json:"min"` // min over min
	Target    float64 `json:"target,omitempty"`
	MeetsGoal *bool   `json:"meets_target,omitempty"`
}

func (b *bench) run() error {
	c := b.cfg
	b.res.Started = time.Now().UTC()
	b.res.Host, _ = os.Hostname()
	var u unix.Utsname
	_ = unix.Uname(&u)
	b.res.Kernel = unix.ByteSliceToString(u.Release[:])
	b.res.CPUs = runtime.NumCPU()
	b.res.Config = c
	b.res.LoadBefore = loadavg()

	if os.Geteuid() != 0 {
		return errors.New("the bench needs root (CRIU, drop_caches)")
	}
	// Restored workloads are orphaned when CRIU exits; as a subreaper the
	// bench becomes their parent and can reap them, so that their PIDs are
	// free again at once.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become subreaper: %w", err)
	}
	for _, d := range []string{c.Dir, c.ShmDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if out, err := exec.CommandContext(b.ctx, c.CRIU, "--version").CombinedOutput(); err == nil {
		if v, perr := criu.ParseVersion(string(out)); perr == nil {
			b.res.CRIUVersion = fmt.Sprintf("%d.%d.%d", v/10000, v/100%100, v%100)
		}
	}
	// cryo remembers a passing `criu check`; let it do so before timing.
	if out, err := exec.CommandContext(b.ctx, c.Cryo, "check", "--criu", c.CRIU).CombinedOutput(); err != nil {
		return fmt.Errorf("cryo check: %v: %s", err, out)
	}
	b.logf("cryo bench: %d MiB mixed workload, %d repetitions per tool, %s", c.MiB, c.Reps, c.condition())
	b.logf("  images and stores in %s, cryo work dirs in %s; load average %s", c.Dir, c.ShmDir, b.res.LoadBefore)

	for rep := 1; rep <= c.Reps; rep++ {
		tools := []string{"criu", "cryo"}
		if rep%2 == 0 {
			tools = []string{"cryo", "criu"}
		}
		for i, tool := range tools {
			r := run{Rep: rep, Tool: tool, Order: i + 1}
			var err error
			if tool == "criu" {
				err = b.criuRound(&r)
			} else {
				err = b.cryoRound(&r)
			}
			if err != nil {
				return fmt.Errorf("rep %d, %s: %w", rep, tool, err)
			}
			b.res.Runs = append(b.res.Runs, r)
		}
	}
	b.res.LoadAfter = loadavg()
	b.summarise()
	if err := b.writeJSON(); err != nil {
		return err
	}
	b.report(os.Stdout)
	return nil
}

// criuRound: raw `criu dump` (kill mode) to disk, then `criu restore -d`.
func (b *bench) criuRound(r *run) error {
	j, err := b.startJob(fmt.Sprintf("criu-r%d", r.Rep))
	if err != nil {
		return err
	}
	images := filepath.Join(b.cfg.Dir, fmt.Sprintf("criu-images-r%d", r.Rep))
	if err := os.Mkdir(images, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(images)
	pid := strconv.Itoa(j.pid)

	if err := b.prepare(); err != nil {
		return err
	}
	d, _, err := b.timed(j.dir, "criu-dump", b.cfg.CRIU, "dump", "-t", pid, "-D", images, "--shell-job", "--tcp-established")
	if err != nil {
		return err
	}
	r.CheckpointNS = int64(d)
	if err := b.waitGone(j.pid, 30*time.Second); err != nil {
		return fmt.Errorf("after criu dump: %w", err)
	}
	if st, err := criu.ReadDumpStats(images); err == nil {
		r.FrozenNS = st.FrozenMS * int64(time.Millisecond)
	}
	if r.FsyncNS, err = fsyncTree(images); err != nil {
		return err
	}
	r.DiskBytes, r.ApparentBytes, err = du(images)
	if err != nil {
		return err
	}

	if err := b.prepare(); err != nil {
		return err
	}
	d, _, err = b.timed(j.dir, "criu-restore", b.cfg.CRIU, "restore", "-D", images, "--shell-job", "--tcp-established", "-d")
	if err != nil {
		return err
	}
	r.RestoreNS = int64(d)
	b.track(j.pid) // CRIU restores the same PID
	if err := b.check(j, j.digest, "after criu restore"); err != nil {
		return err
	}
	r.DigestOK = true
	b.logf("rep %d criu: dump %s (frozen %s), %s on disk; restore %s; memory intact",
		r.Rep, secs(r.CheckpointNS), secs(r.FrozenNS), human(r.DiskBytes), secs(r.RestoreNS))
	return b.kill(j.pid)
}

// cryoRound: `cryo checkpoint --kill`, `cryo restore`, then the second
// generation: the restored job changes ~5% of its memory and is
// checkpointed again, leave-running; that generation must restore too.
func (b *bench) cryoRound(r *run) error {
	j, err := b.startJob(fmt.Sprintf("cryo-r%d", r.Rep))
	if err != nil {
		return err
	}
	store := filepath.Join(b.cfg.Dir, fmt.Sprintf("cryo-store-r%d", r.Rep))
	defer os.RemoveAll(store)
	common := []string{"--json", "-v", "--criu", b.cfg.CRIU, "--store", store, "--work-dir", b.cfg.ShmDir}

	if err := b.prepare(); err != nil {
		return err
	}
	d, out, err := b.timed(j.dir, "cryo-checkpoint", b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--kill", strconv.Itoa(j.pid))...)
	if err != nil {
		return err
	}
	r.CheckpointNS = int64(d)
	var cp cryoCheckpoint
	if err := json.Unmarshal(out, &cp); err != nil {
		return fmt.Errorf("cryo checkpoint output %q: %w", out, err)
	}
	if !cp.Killed {
		return fmt.Errorf("cryo checkpoint --kill did not report the job killed: %s", out)
	}
	if err := b.waitGone(j.pid, 30*time.Second); err != nil {
		return fmt.Errorf("after cryo checkpoint --kill: %w", err)
	}
	r.FrozenNS, r.DurableNS, r.RawBytes, r.NewBytes = cp.FrozenNS, cp.DurableNS, cp.RawBytes, cp.NewBytes
	if m, err := readManifestStats(store, cp.Generation); err == nil {
		r.DumpNS = m.DumpMS * int64(time.Millisecond)
	}
	r.DiskBytes, r.ApparentBytes, err = du(store)
	if err != nil {
		return err
	}

	if err := b.prepare(); err != nil {
		return err
	}
	d, out, err = b.timed(j.dir, "cryo-restore", b.cfg.Cryo, append([]string{"restore"}, common...)...)
	if err != nil {
		return err
	}
	r.RestoreNS = int64(d)
	var rs cryoRestore
	if err := json.Unmarshal(out, &rs); err != nil {
		return fmt.Errorf("cryo restore output %q: %w", out, err)
	}
	b.track(rs.PID)
	if rs.PID != j.pid {
		return fmt.Errorf("cryo restore gave pid %d, the job was pid %d", rs.PID, j.pid)
	}
	r.MaterializeNS, r.CRIURestoreNS = rs.MaterializeNS, rs.RestoreNS
	if err := b.check(j, j.digest, "after cryo restore"); err != nil {
		return err
	}
	r.DigestOK = true
	b.logf("rep %d cryo: checkpoint %s (frozen %s, criu dump inside %s), %s on disk; restore %s (materialize %s, criu %s); memory intact",
		r.Rep, secs(r.CheckpointNS), secs(r.FrozenNS), secs(r.DumpNS), human(r.DiskBytes),
		secs(r.RestoreNS), secs(r.MaterializeNS), secs(r.CRIURestoreNS))

	inc, err := b.secondGeneration(r.Rep, j, store, common, cp)
	if err != nil {
		return fmt.Errorf("second generation: %w", err)
	}
	b.res.Incremental = append(b.res.Incremental, inc)
	return nil
}

func (b *bench) secondGeneration(rep int, j *job, store string, common []string, gen1 cryoCheckpoint) (incremental, error) {
	inc := incremental{Rep: rep, Gen1NewBytes: gen1.NewBytes}
	changed, err := b.signal(j, syscall.SIGUSR2)
	if err != nil {
		return inc, fmt.Errorf("change 5%% of the memory: %w", err)
	}
	if changed == j.digest {
		return inc, errors.New("the workload's digest did not change after SIGUSR2")
	}
	before, _, err := du(store)
	if err != nil {
		return inc, err
	}
	if err := b.prepare(); err != nil {
		return inc, err
	}
	d, out, err := b.timed(j.dir, "cryo-checkpoint-gen2", b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--leave-running", strconv.Itoa(j.pid))...)
	if err != nil {
		return inc, err
	}
	var cp cryoCheckpoint
	if err := json.Unmarshal(out, &cp); err != nil {
		return inc, fmt.Errorf("cryo checkpoint output %q: %w", out, err)
	}
	after, _, err := du(store)
	if err != nil {
		return inc, err
	}
	inc.WallNS, inc.FrozenNS, inc.RawBytes, inc.NewBytes, inc.StoreGrowth = int64(d), cp.FrozenNS, cp.RawBytes, cp.NewBytes, after-before
	if err := b.check(j, changed, "after leave-running checkpoint"); err != nil {
		return inc, err
	}
	inc.RunningOK = true
	if err := b.kill(j.pid); err != nil {
		return inc, err
	}
	if err := b.prepare(); err != nil {
		return inc, err
	}
	d, out, err = b.timed(j.dir, "cryo-restore-gen2-lazy", b.cfg.Cryo, append([]string{"restore", "--lazy"}, common...)...)
	if err != nil {
		return inc, err
	}
	var rs cryoRestore
	if err := json.Unmarshal(out, &rs); err != nil {
		return inc, fmt.Errorf("cryo restore output %q: %w", out, err)
	}
	b.track(rs.PID)
	inc.LazyStartNS, inc.LazyWallNS, inc.LazyBytes = rs.MaterializeNS+rs.RestoreNS, int64(d), rs.LazyBytes
	if err := b.check(j, changed, "after restoring generation 2 lazily"); err != nil {
		return inc, err
	}
	inc.RestoreOK = true
	b.logf("rep %d cryo generation 2 (5%% changed, leave-running): %s new of %s, store grew %s; checkpoint %s (frozen %s); lazy restore: running after %s, %s served, whole after %s; memory intact while running and after restore",
		rep, human(inc.NewBytes), human(inc.RawBytes), human(inc.StoreGrowth), secs(inc.WallNS), secs(inc.FrozenNS),
		secs(inc.LazyStartNS), human(inc.LazyBytes), secs(inc.LazyWallNS))
	return inc, b.kill(rs.PID)
}

// cryoCheckpoint and cryoRestore are the parts of cryo's --json output the
// bench reads.
type cryoCheckpoint struct {
	Generation int   `json:"generation"`
	FrozenNS   int64 `json:"frozen_ns"`
	DurableNS  int64 `json:"durable_ns"`
	RawBytes   int64 `json:"raw_bytes"`
	NewBytes   int64 `json:"new_bytes"`
	Killed     bool  `json:"killed"`
}

type cryoRestore struct {
	PID           int   `json:"pid"`
	MaterializeNS int64 `json:"materialize_ns"`
	RestoreNS     int64 `json:"restore_ns"`
	LazyBytes     int64 `json:"lazy_bytes"`
}

type manifestStats struct {
	DumpMS int64 `json:"dump_ms"`
}

func readManifestStats(store string, gen int) (manifestStats, error) {
	var m struct {
		Stats manifestStats `json:"stats"`
	}
	data, err := os.ReadFile(filepath.Join(store, "checkpoints", strconv.Itoa(gen), "manifest.json"))
	if err != nil {
		return m.Stats, err
	}
	err = json.Unmarshal(data, &m)
	return m.Stats, err
}

// job is one workload process.
type job struct {
	pid    int
	dir    string // its output, digest file and the tools' logs
	digest string // SHA-256 of its memory right after the fill
}

func (j *job) digestFile() string { return filepath.Join(j.dir, "digest") }

// startJob starts a workload in a session of its own and waits until it has
// filled its memory.
func (b *bench) startJob(name string) (*job, error) {
	j := &job{dir: filepath.Join(b.cfg.Dir, name)}
	if err := os.Mkdir(j.dir, 0o700); err != nil {
		return nil, err
	}
	out, err := os.Create(filepath.Join(j.dir, "job.out"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(b.cfg.Workload, "-mib", strconv.Itoa(b.cfg.MiB), "-digest", j.digestFile())
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start workload: %w", err)
	}
	j.pid = cmd.Process.Pid
	_ = cmd.Process.Release() // the bench reaps it by PID (track)
	b.track(j.pid)
	j.digest, err = b.awaitDigest(j, b.fillTimeout())
	if err != nil {
		return nil, fmt.Errorf("workload pid %d: %w", j.pid, err)
	}
	if b.res.Digest == "" {
		b.res.Digest = j.digest
	} else if j.digest != b.res.Digest {
		return nil, fmt.Errorf("workload pid %d filled its memory differently (%s, before %s)", j.pid, j.digest, b.res.Digest)
	}
	return j, nil
}

func (b *bench) fillTimeout() time.Duration {
	return 2*time.Minute + time.Duration(b.cfg.MiB)*100*time.Millisecond
}

// signal sends sig to the workload and returns the digest it then writes.
func (b *bench) signal(j *job, sig syscall.Signal) (string, error) {
	if err := os.Remove(j.digestFile()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if err := syscall.Kill(j.pid, sig); err != nil {
		return "", fmt.Errorf("signal pid %d: %w", j.pid, err)
	}
	return b.awaitDigest(j, b.fillTimeout())
}

// check asks the workload to hash its memory and compares with want.
func (b *bench) check(j *job, want, when string) error {
	got, err := b.signal(j, syscall.SIGUSR1)
	if err != nil {
		return fmt.Errorf("%s: %w", when, err)
	}
	if got != want {
		return fmt.Errorf("%s: memory of pid %d is NOT intact: digest %s, want %s", when, j.pid, got, want)
	}
	return nil
}

func (b *bench) awaitDigest(j *job, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		data, err := os.ReadFile(j.digestFile())
		if err == nil {
			return strings.TrimSpace(string(data)), nil
		}
		if !b.alive(j.pid) {
			out, _ := os.ReadFile(filepath.Join(j.dir, "job.out"))
			return "", fmt.Errorf("workload died before writing its digest; its output: %q", tail(string(out), 500))
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no digest after %s", timeout)
		}
		select {
		case <-b.ctx.Done():
			return "", b.ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// track starts reaping pid: the bench's child, or an orphan that will be
// reparented to the bench (its subreaper) once CRIU exits.
func (b *bench) track(pid int) {
	done := make(chan struct{})
	b.mu.Lock()
	b.procs[pid] = done
	b.mu.Unlock()
	go func() {
		defer close(done)
		for {
			var ws unix.WaitStatus
			got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
			if got == pid || (errors.Is(err, unix.ECHILD) && !exists(pid)) {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
}

func (b *bench) alive(pid int) bool {
	b.mu.Lock()
	done, ok := b.procs[pid]
	b.mu.Unlock()
	if !ok {
		return exists(pid)
	}
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// waitGone waits until the tracked pid has exited and been reaped.
func (b *bench) waitGone(pid int, timeout time.Duration) error {
	b.mu.Lock()
	done, ok := b.procs[pid]
	b.mu.Unlock()
	if !ok {
		return fmt.Errorf("pid %d is not tracked", pid)
	}
	select {
	case <-done:
		b.mu.Lock()
		if b.procs[pid] == done {
			delete(b.procs, pid)
		}
		b.mu.Unlock()
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("pid %d still exists after %s", pid, timeout)
	}
}

func (b *bench) kill(pid int) error {
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill pid %d: %w", pid, err)
	}
	return b.waitGone(pid, 30*time.Second)
}

// cleanup kills every workload still tracked, and any other process running
// the bench's private copy of the workload binary (e.g. one restored just
// before a failure), then removes the bench's directories.
func (b *bench) cleanup() error {
	var errs []error
	b.mu.Lock()
	var pids []int
	for pid := range b.procs {
		pids = append(pids, pid)
	}
	b.mu.Unlock()
	for _, pid := range running(b.cfg.Workload) {
		if !slices.Contains(pids, pid) {
			b.track(pid)
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, pid := range pids {
		if err := b.waitGone(pid, 30*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range []string{b.cfg.Dir, b.cfg.ShmDir} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// running lists the processes whose executable is exe.
func running(exe string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && strings.TrimSuffix(p, " (deleted)") == exe {
			pids = append(pids, pid)
		}
	}
	return pids
}

// timed runs one tool command and returns its wall time and stdout. Its
// stderr goes to a log in logDir, whose end is shown when it fails.
func (b *bench) timed(logDir, name, bin string, args ...string) (time.Duration, []byte, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.fillTimeout()+5*time.Minute)
	defer cancel()
	logPath := filepath.Join(logDir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return 0, nil, err
	}
	defer logf.Close()
	var stdout bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, logf
	// Interrupted CRIU unwinds on SIGTERM (and thaws what it froze).
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	t0 := time.Now()
	err = cmd.Run()
	d := time.Since(t0)
	if err != nil {
		log, _ := os.ReadFile(logPath)
		return d, nil, fmt.Errorf("%s %s: %w\n--- stdout:\n%s--- end of its log (%s):\n%s", filepath.Base(bin),
			strings.Join(args, " "), err, stdout.String(), logPath, tail(string(log), 3000))
	}
	return d, stdout.Bytes(), nil
}

// condition says how every timed step starts.
func (c config) condition() string {
	s := "caches dropped"
	if c.Settle > 0 {
		s += fmt.Sprintf(", %v idle", c.Settle)
	}
	if c.WarmMiB > 0 {
		return s + fmt.Sprintf(", %d MiB of fresh memory touched and freed (warm) before each timed step", c.WarmMiB)
	}
	return s + " before each timed step, no warm-up (cold)"
}

// prepare puts the machine in the same condition before every timed step:
// dirty pages written back, page caches dropped, Settle idle, and WarmMiB
// of fresh memory touched and freed (the VM gives freed memory back to the
// host within about a second; touching it again first is slow, and would
// otherwise be charged to whichever tool happens to need it).
func (b *bench) prepare() error {
	if err := b.ctx.Err(); err != nil {
		return err
	}
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		return fmt.Errorf("drop caches: %w", err)
	}
	if b.cfg.Settle > 0 {
		select {
		case <-time.After(b.cfg.Settle):
		case <-b.ctx.Done():
			return b.ctx.Err()
		}
	}
	if b.cfg.WarmMiB == 0 {
		return nil
	}
	t0 := time.Now()
	mem, err := unix.Mmap(-1, 0, b.cfg.WarmMiB<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("warm-up mmap: %w", err)
	}
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = 1
	}
	if err := unix.Munmap(mem); err != nil {
		return fmt.Errorf("warm-up munmap: %w", err)
	}
	b.res.WarmTouch = append(b.res.WarmTouch, int64(time.Since(t0)))
	return nil
}

// du returns the allocated bytes (as du) and the apparent bytes (as du -b)
// of the files under dir.
func du(dir string) (disk, apparent int64, err error) {
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		disk += st.Blocks * 512
		if !d.IsDir() {
			apparent += st.Size
		}
		return nil
	})
	return disk, apparent, err
}

// fsyncTree fsyncs every file under dir and returns how long it took.
func fsyncTree(dir string) (int64, error) {
	t0 := time.Now()
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	})
	return int64(time.Since(t0)), err
}

// summarise computes the summary rows and ratios.
func (b *bench) summarise() {
	pick := func(tool string, f func(run) int64) []int64 {
		var v []int64
		for _, r := range b.res.Runs {
			if r.Tool == tool {
				v = append(v, f(r))
			}
		}
		return v
	}
	row := func(name, unit string, v []int64) summaryRow {
		return summaryRow{Name: name, Unit: unit, Min: minOf(v), Median: median(v), Values: v}
	}
	var incNew, incGrowth, incWall, incFrozen, incLazyStart, incLazyWall []int64
	for _, x := range b.res.Incremental {
		incNew = append(incNew, x.NewBytes)
		incGrowth = append(incGrowth, x.StoreGrowth)
		incWall = append(incWall, x.WallNS)
		incFrozen = append(incFrozen, x.FrozenNS)
		incLazyStart = append(incLazyStart, x.LazyStartNS)
		incLazyWall = append(incLazyWall, x.LazyWallNS)
	}
	lazyStart := row("gen 2: cryo restore --lazy, job running", "ns", incLazyStart)
	ckCRIU := row("checkpoint wall: criu dump", "ns", pick("criu", func(r run) int64 { return r.CheckpointNS }))
	ckCryo := row("checkpoint wall: cryo checkpoint --kill", "ns", pick("cryo", func(r run) int64 { return r.CheckpointNS }))
	byCRIU := row("bytes on disk: criu images", "bytes", pick("criu", func(r run) int64 { return r.DiskBytes }))
	byCryo := row("bytes on disk: cryo store", "bytes", pick("cryo", func(r run) int64 { return r.DiskBytes }))
	rsCRIU := row("restore wall: criu restore -d", "ns", pick("criu", func(r run) int64 { return r.RestoreNS }))
	rsCryo := row("restore wall: cryo restore", "ns", pick("cryo", func(r run) int64 { return r.RestoreNS }))
	ckDurable := row("  criu dump + fsync of its images", "ns", pick("criu", func(r run) int64 { return r.CheckpointNS + r.FsyncNS }))
	frCRIU := row("  frozen (criu stats): criu dump", "ns", pick("criu", func(r run) int64 { return r.FrozenNS }))
	b.res.Summary = []summaryRow{
		ckCRIU, ckCryo, ckDurable, frCRIU,
		row("  frozen (reported): cryo --kill", "ns", pick("cryo", func(r run) int64 { return r.FrozenNS })),
		row("  cryo: criu dump inside", "ns", pick("cryo", func(r run) int64 { return r.DumpNS })),
		row("  cryo: durable (reported)", "ns", pick("cryo", func(r run) int64 { return r.DurableNS })),
		byCRIU, byCryo,
		row("  apparent bytes: criu images", "bytes", pick("criu", func(r run) int64 { return r.ApparentBytes })),
		row("  apparent bytes: cryo store", "bytes", pick("cryo", func(r run) int64 { return r.ApparentBytes })),
		row("  cryo raw image bytes", "bytes", pick("cryo", func(r run) int64 { return r.RawBytes })),
		rsCRIU, rsCryo,
		row("  cryo: materialize", "ns", pick("cryo", func(r run) int64 { return r.MaterializeNS })),
		row("  cryo: criu restore inside", "ns", pick("cryo", func(r run) int64 { return r.CRIURestoreNS })),
		row("gen 2 (5% changed): new bytes", "bytes", incNew),
		row("gen 2 (5% changed): store growth", "bytes", incGrowth),
		row("gen 2: checkpoint wall (leave-running)", "ns", incWall),
		row("gen 2: frozen (reported)", "ns", incFrozen),
		lazyStart,
		row("gen 2: cryo restore --lazy, memory whole", "ns", incLazyWall),
	}
	if len(b.res.WarmTouch) > 0 { // none in a cold bench
		b.res.Summary = append(b.res.Summary, row("warm-up touch-and-free", "ns", b.res.WarmTouch))
	}
	mk := func(name string, num, den summaryRow, target float64) ratio {
		r := ratio{Name: name, Median: num.Median / den.Median, Min: num.Min / den.Min, Target: target}
		if target > 0 {
			ok := r.Median <= target
			r.MeetsGoal = &ok
		}
		return r
	}
	b.res.Ratios = []ratio{
		mk("cryo checkpoint --kill / criu dump + fsync (wall)", ckCryo, ckDurable, targetDurable),
		mk("cryo checkpoint --kill / criu dump (wall)", ckCryo, ckCRIU, 0),
		mk("cryo_bytes/criu_bytes", byCryo, byCRIU, targetBytes),
		mk("cryo_restore/criu_restore wall", rsCryo, rsCRIU, targetRestore),
	}
	if len(incNew) > 0 {
		b.res.Ratios = append(b.res.Ratios,
			mk("frozen: cryo leave-running / criu dump", row("", "", incFrozen), frCRIU, targetFrozen),
			mk("gen2 new bytes / gen1 raw bytes", row("", "", incNew),
				row("", "", pick("cryo", func(r run) int64 { return r.RawBytes })), targetGen2),
			mk("cryo_lazy_running/criu_restore wall", lazyStart, rsCRIU, targetLazyStart))
	}
}

func (b *bench) report(w io.Writer) {
	c := b.cfg
	fmt.Fprintf(w, "\ncryo vs raw CRIU %s: %d MiB workload (20%% random, 30%% zero pages, 50%% structured), %d reps each, alternating\n",
		b.res.CRIUVersion, c.MiB, c.Reps)
	fmt.Fprintf(w, "host %s, kernel %s, %d CPUs; load average before %s, after %s\n",
		b.res.Host, b.res.Kernel, b.res.CPUs, b.res.LoadBefore, b.res.LoadAfter)
	fmt.Fprintf(w, "%s\n", c.condition())
	fmt.Fprintf(w, "every restore verified: the workload's memory digest equals the one taken before the checkpoint\n\n")
	fmt.Fprintf(w, "%-42s %12s %12s   %s\n", "", "min", "median", "all")
	for _, r := range b.res.Summary {
		var all []string
		for _, v := range r.Values {
			all = append(all, format(r.Unit, float64(v)))
		}
		fmt.Fprintf(w, "%-42s %12s %12s   %s\n", r.Name, format(r.Unit, r.Min), format(r.Unit, r.Median), strings.Join(all, " "))
	}
	fmt.Fprintf(w, "\n%-50s %8s %8s %9s\n", "ratio (cryo / raw CRIU)", "median", "min", "target")
	for _, r := range b.res.Ratios {
		verdict, target := "", ""
		if r.MeetsGoal != nil {
			target = fmt.Sprintf("<= %.2fx", r.Target)
			verdict = "MISSED"
			if *r.MeetsGoal {
				verdict = "ok"
			}
		}
		fmt.Fprintf(w, "%-50s %7.2fx %7.2fx %9s  %s\n", r.Name, r.Median, r.Min, target, verdict)
	}
	for _, r := range b.res.Summary {
		if r.Name == "  frozen (reported): cryo" {
			fmt.Fprintf(w, "cryo frozen time (reported)        %s median, %s min\n", format("ns", r.Median), format("ns", r.Min))
		}
	}
	fmt.Fprintf(w, "\nresults: %s\n", c.JSONOut)
}

func (b *bench) writeJSON() error {
	data, err := json.MarshalIndent(&b.res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(b.cfg.JSONOut), 0o755); err != nil {
		return err
	}
	return os.WriteFile(b.cfg.JSONOut, append(data, '\n'), 0o644)
}

func (b *bench) logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

func minOf(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	return float64(slices.Min(v))
}

func median(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return float64(s[len(s)/2])
	}
	return float64(s[len(s)/2-1]+s[len(s)/2]) / 2
}

func format(unit string, v float64) string {
	if unit == "bytes" {
		return human(int64(v))
	}
	return secs(int64(v))
}

func secs(ns int64) string { return fmt.Sprintf("%.3fs", float64(ns)/1e9) }

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%dB", n)
	}
}

func exists(pid int) bool {
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	return err == nil
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return d
	}
	return def
}
