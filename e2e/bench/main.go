// Command bench compares cryo with raw CRIU on the same workload in the same
// run: `criu dump` against `cryo checkpoint --kill`, `criu restore -d`
// against `cryo restore`, the bytes each leaves on disk, and what later
// cryo generations add: one after the job changed a word in each of 0.1%
// of its pages, scattered (gen 2), and one after it changed 5% of its
// memory in four contiguous stretches (gen 3), which is then restored
// lazily. It also counts the files of the first generation and cryo's
// peak resident memory, and, with -rss, measures only that for jobs of
// the sizes given (cryo's memory must not grow with the job).
//
// It is run by scripts/bench.sh (make bench), which builds it and the
// workload (e2e/workloads/mixed). Every timed step starts from the same
// condition for every tool: dirty pages synced, page caches dropped, and,
// in the warm half, a few GiB of fresh memory touched and freed just
// before, because these VMs hand freed memory back to the host and
// touching it again is slow; in the cold half, an idle spell instead.
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
	"io/fs"
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
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// Targets are those of the storage issue (medians): checkpoint until
// durable against raw criu dump + fsync of its images, restore against
// criu restore, bytes stored against the raw images, the files of a first
// generation per GiB of it, what a generation adds after a scattered 0.1%
// change against the compressed size of the pages changed (and against
// the first generation), what one adds after a contiguous 5% change
// against the first generation's raw size, cryo's peak resident memory,
// and (kept from before) the frozen time of a leave-running checkpoint
// and a lazy restore's time to a running job.
const (
	targetDurable       = 0.8
	targetRestore       = 0.85
	targetBytes         = 0.22
	targetFilesPerGiB   = 2
	targetScattered     = 3
	targetScatteredGen1 = 0.005
	targetContiguous    = 0.06
	targetRSSMiB        = 256
	targetFrozen        = 1.0
	targetLazyStart     = 0.2
)

type config struct {
	Cryo     string `json:"cryo"`
	CRIU     string `json:"criu"`
	Workload string `json:"workload"`
	Dir      string `json:"dir"`     // on the disk of the store: CRIU images and cryo stores
	ShmDir   string `json:"shm_dir"` // RAM-backed: cryo's --work-dir
	MiB      int    `json:"mib"`
	Reps     int    `json:"reps"`
	// Conditions are the halves of the bench, each run in full: "warm"
	// (WarmMiB of fresh memory touched and freed before each timed step,
	// after Settle) and "cold" (ColdSettle idle, no warm-up).
	Conditions []string      `json:"conditions"`
	WarmMiB    int           `json:"warm_mib"`
	Settle     time.Duration `json:"settle_ns"`
	ColdSettle time.Duration `json:"cold_settle_ns"`
	// RSSMiB, when set, makes the run measure only cryo's peak resident
	// memory, for a job of each of these sizes.
	RSSMiB  []int  `json:"rss_mib,omitempty"`
	JSONOut string `json:"-"`
}

func main() {
	var c config
	var conds, rss string
	flag.StringVar(&c.Cryo, "cryo", "bin/cryo", "cryo binary")
	flag.StringVar(&c.CRIU, "criu", envOr("CRYO_CRIU", "criu"), "CRIU binary, used raw and by cryo")
	flag.StringVar(&c.Workload, "workload", "", "the mixed workload binary (required)")
	flag.StringVar(&c.Dir, "dir", "", "directory on the store's disk for images and stores (required; the bench removes what it makes there)")
	flag.StringVar(&c.ShmDir, "shm", "", "RAM-backed directory for cryo's work dirs (required)")
	flag.IntVar(&c.MiB, "mib", envInt("BENCH_MIB", 2048), "MiB of workload memory")
	flag.IntVar(&c.Reps, "reps", envInt("BENCH_REPS", 3), "repetitions per tool and condition")
	flag.StringVar(&conds, "conditions", envOr("BENCH_CONDITIONS", "warm,cold"), "halves of the bench: warm, cold or both")
	flag.IntVar(&c.WarmMiB, "warm-mib", envInt("BENCH_WARM_MIB", -1), "warm: MiB of fresh memory touched and freed before each timed step (-1: 2*mib+512, at least 2048)")
	flag.DurationVar(&c.Settle, "settle", envDuration("BENCH_SETTLE", 0), "warm: idle this long before each timed step")
	flag.DurationVar(&c.ColdSettle, "cold-settle", envDuration("BENCH_COLD_SETTLE", 5*time.Second), "cold: idle this long before each timed step")
	flag.StringVar(&rss, "rss", "", "measure only cryo's peak memory, for jobs of these MiB (comma-separated)")
	flag.StringVar(&c.JSONOut, "json", "", "write the results as JSON here (required)")
	flag.Parse()
	if c.WarmMiB < 0 {
		// Enough for the largest need of one step: cryo restore holds the
		// materialized images and the restored job at once.
		c.WarmMiB = max(2048, 2*c.MiB+512)
	}
	for _, s := range strings.Split(conds, ",") {
		if s = strings.TrimSpace(s); s == "warm" || s == "cold" {
			c.Conditions = append(c.Conditions, s)
		} else if s != "" {
			fmt.Fprintf(os.Stderr, "bench: unknown condition %q (warm, cold)\n", s)
			os.Exit(2)
		}
	}
	for _, s := range strings.Split(rss, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n > 0 {
			c.RSSMiB = append(c.RSSMiB, n)
		} else if strings.TrimSpace(s) != "" {
			fmt.Fprintf(os.Stderr, "bench: -rss %q: want MiB, comma-separated\n", rss)
			os.Exit(2)
		}
	}
	if c.Workload == "" || c.Dir == "" || c.ShmDir == "" || c.JSONOut == "" || c.MiB <= 0 || c.Reps <= 0 || len(c.Conditions) == 0 {
		fmt.Fprintln(os.Stderr, "bench: -workload, -dir, -shm and -json are required; -mib and -reps must be > 0; -conditions not empty")
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
	cond  condition // of the half running now
	mib   int       // the workload's size now
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
	Halves      []half        `json:"halves"`
	RSS         []rssRun      `json:"rss,omitempty"`
	WarmTouch   []int64       `json:"warm_touch_ns"` // how long each touch-and-free took
}

// half is the summary of one condition.
type half struct {
	Condition condition    `json:"condition"`
	Summary   []summaryRow `json:"summary"`
	Ratios    []ratio      `json:"ratios"`
}

// run is one tool's checkpoint and restore in one repetition.
type run struct {
	Cond          string `json:"condition"`
	Rep           int    `json:"rep"`
	Tool          string `json:"tool"` // "criu" or "cryo"
	Order         int    `json:"order"`
	CheckpointNS  int64  `json:"checkpoint_wall_ns"`
	RestoreNS     int64  `json:"restore_wall_ns"`
	DiskBytes     int64  `json:"disk_bytes"`     // allocated blocks (du)
	ApparentBytes int64  `json:"apparent_bytes"` // sum of file sizes (du -b)
	FrozenNS      int64  `json:"frozen_ns"`      // CRIU's frozen time (stats-dump; cryo reports it)
	DigestOK      bool   `json:"digest_ok"`
	CheckpointRSS int64  `json:"checkpoint_maxrss_kib"` // the tool's peak resident memory
	RestoreRSS    int64  `json:"restore_maxrss_kib"`
	// raw CRIU only
	FsyncNS int64 `json:"images_fsync_ns,omitempty"` // fsync of every image after the dump (not in the wall time)
	// cryo only
	DurableNS     int64 `json:"durable_ns,omitempty"`
	DumpNS        int64 `json:"criu_dump_in_cryo_ns,omitempty"`
	RawBytes      int64 `json:"raw_bytes,omitempty"`
	NewBytes      int64 `json:"new_bytes,omitempty"`
	Files         int   `json:"files,omitempty"` // files of the first generation (packs, manifest)
	MaterializeNS int64 `json:"materialize_ns,omitempty"`
	CRIURestoreNS int64 `json:"criu_restore_in_cryo_ns,omitempty"`
}

// incremental is a later cryo generation, taken leave-running after the
// restored job changed some of its memory: "scattered" (a word in each of
// 0.1% of its pages) or "contiguous" (5% in four stretches).
type incremental struct {
	Cond         string `json:"condition"`
	Rep          int    `json:"rep"`
	Kind         string `json:"kind"`
	WallNS       int64  `json:"wall_ns"`
	FrozenNS     int64  `json:"frozen_ns"`
	RawBytes     int64  `json:"raw_bytes"`
	NewBytes     int64  `json:"new_bytes"`
	StoreGrowth  int64  `json:"store_growth_bytes"`
	Gen1RawBytes int64  `json:"gen1_raw_bytes"`
	Gen1Disk     int64  `json:"gen1_disk_bytes"`
	MaxRSS       int64  `json:"maxrss_kib"`
	// ChangedBytes are the pages a scattered change touched, and
	// ChangedZstd their size compressed (zstd, one frame).
	ChangedBytes int64 `json:"changed_bytes,omitempty"`
	ChangedZstd  int64 `json:"changed_zstd_bytes,omitempty"`
	RunningOK    bool  `json:"memory_intact_after_leave_running"`
	RestoreOK    bool  `json:"restores_intact"`
	// The contiguous generation is restored with --lazy: the job runs
	// after LazyStartNS (cryo's materialize + CRIU restore), its memory is
	// whole after LazyWallNS (cryo restore --lazy returns then).
	LazyStartNS int64 `json:"lazy_start_ns,omitempty"`
	LazyWallNS  int64 `json:"lazy_wall_ns,omitempty"`
	LazyBytes   int64 `json:"lazy_bytes,omitempty"`
}

// rssRun is cryo's peak memory for one job size (-rss).
type rssRun struct {
	MiB          int   `json:"mib"`
	KillRSS      int64 `json:"checkpoint_kill_maxrss_kib"`
	RestoreRSS   int64 `json:"restore_maxrss_kib"`
	LeaveRSS     int64 `json:"checkpoint_leave_running_maxrss_kib"`
	KillNS       int64 `json:"checkpoint_kill_ns"`
	RestoreNS    int64 `json:"restore_ns"`
	LeaveNS      int64 `json:"checkpoint_leave_running_ns"`
	LeaveFrozeNS int64 `json:"leave_running_frozen_ns"`
}

type summaryRow struct {
	Name   string  `json:"name"`
	Unit   string  `json:"unit"` // "ns", "bytes", "kib" or "count"
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Max    float64 `json:"max"`
	Values []int64 `json:"values"`
}

type ratio struct {
	Name      string  `json:"name"`
	Median    float64 `json:"median"`
	Min       float64 `json:"min"` // min over min
	Max       float64 `json:"max"` // max over max
	Unit      string  `json:"unit,omitempty"`
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
	b.mib = c.MiB

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
	if len(c.RSSMiB) > 0 {
		return b.rssOnly()
	}
	b.logf("cryo bench: %d MiB mixed workload, %d repetitions per tool, halves %v", c.MiB, c.Reps, c.Conditions)
	b.logf("  images and stores in %s, cryo work dirs in %s; load average %s", c.Dir, c.ShmDir, b.res.LoadBefore)

	for _, name := range c.Conditions {
		b.cond = condition{Name: name, WarmMiB: c.WarmMiB, Settle: c.Settle}
		if name == "cold" {
			b.cond = condition{Name: name, Settle: c.ColdSettle}
		}
		b.logf("%s half: %s", name, b.cond)
		for rep := 1; rep <= c.Reps; rep++ {
			tools := []string{"criu", "cryo"}
			if rep%2 == 0 {
				tools = []string{"cryo", "criu"}
			}
			for i, tool := range tools {
				r := run{Cond: name, Rep: rep, Tool: tool, Order: i + 1}
				var err error
				if tool == "criu" {
					err = b.criuRound(&r)
				} else {
					err = b.cryoRound(&r)
				}
				if err != nil {
					return fmt.Errorf("%s, rep %d, %s: %w", name, rep, tool, err)
				}
				b.res.Runs = append(b.res.Runs, r)
			}
		}
		b.res.Halves = append(b.res.Halves, b.summarise(b.cond))
	}
	b.res.LoadAfter = loadavg()
	if err := b.writeJSON(); err != nil {
		return err
	}
	b.report(os.Stdout)
	return nil
}

// criuRound: raw `criu dump` (kill mode) to disk, then `criu restore -d`.
func (b *bench) criuRound(r *run) error {
	j, err := b.startJob(fmt.Sprintf("criu-%s-r%d", r.Cond, r.Rep))
	if err != nil {
		return err
	}
	images := filepath.Join(b.cfg.Dir, fmt.Sprintf("criu-images-%s-r%d", r.Cond, r.Rep))
	if err := os.Mkdir(images, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(images)
	pid := strconv.Itoa(j.pid)

	if err := b.prepare(); err != nil {
		return err
	}
	d, _, rss, err := b.timed(j.dir, "criu-dump", b.cfg.CRIU, "dump", "-t", pid, "-D", images, "--shell-job", "--tcp-established")
	if err != nil {
		return err
	}
	r.CheckpointNS, r.CheckpointRSS = int64(d), rss
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
	d, _, rss, err = b.timed(j.dir, "criu-restore", b.cfg.CRIU, "restore", "-D", images, "--shell-job", "--tcp-established", "-d")
	if err != nil {
		return err
	}
	r.RestoreNS, r.RestoreRSS = int64(d), rss
	b.track(j.pid) // CRIU restores the same PID
	if err := b.check(j, j.digest, "after criu restore"); err != nil {
		return err
	}
	r.DigestOK = true
	b.logf("%s rep %d criu: dump %s (frozen %s), %s on disk; restore %s; memory intact",
		r.Cond, r.Rep, secs(r.CheckpointNS), secs(r.FrozenNS), human(r.DiskBytes), secs(r.RestoreNS))
	return b.kill(j.pid)
}

// cryoRound: `cryo checkpoint --kill`, `cryo restore`, then the later
// generations: the restored job changes 0.1% of its pages, scattered, and
// is checkpointed leave-running (gen 2); then 5% of its memory,
// contiguous, and again (gen 3), which is restored lazily.
func (b *bench) cryoRound(r *run) error {
	j, err := b.startJob(fmt.Sprintf("cryo-%s-r%d", r.Cond, r.Rep))
	if err != nil {
		return err
	}
	store := filepath.Join(b.cfg.Dir, fmt.Sprintf("cryo-store-%s-r%d", r.Cond, r.Rep))
	defer os.RemoveAll(store)
	common := []string{"--json", "-v", "--criu", b.cfg.CRIU, "--store", store, "--work-dir", b.cfg.ShmDir}

	if err := b.prepare(); err != nil {
		return err
	}
	d, out, rss, err := b.timed(j.dir, "cryo-checkpoint", b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--kill", strconv.Itoa(j.pid))...)
	if err != nil {
		return err
	}
	r.CheckpointNS, r.CheckpointRSS = int64(d), rss
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
	if r.Files, err = generationFiles(store); err != nil {
		return err
	}

	if err := b.prepare(); err != nil {
		return err
	}
	d, out, rss, err = b.timed(j.dir, "cryo-restore", b.cfg.Cryo, append([]string{"restore"}, common...)...)
	if err != nil {
		return err
	}
	r.RestoreNS, r.RestoreRSS = int64(d), rss
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
	b.logf("%s rep %d cryo: checkpoint %s (frozen %s, criu dump inside %s), %s on disk in %d files; restore %s (materialize %s, criu %s); peak memory %s / %s; memory intact",
		r.Cond, r.Rep, secs(r.CheckpointNS), secs(r.FrozenNS), secs(r.DumpNS), human(r.DiskBytes), r.Files,
		secs(r.RestoreNS), secs(r.MaterializeNS), secs(r.CRIURestoreNS), human(r.CheckpointRSS<<10), human(r.RestoreRSS<<10))

	for _, kind := range []string{"scattered", "contiguous"} {
		inc, err := b.laterGeneration(r, kind, j, store, common)
		if err != nil {
			return fmt.Errorf("%s generation: %w", kind, err)
		}
		b.res.Incremental = append(b.res.Incremental, inc)
	}
	return nil
}

// laterGeneration changes the running job's memory (kind) and checkpoints
// it leave-running; after the contiguous change, the generation is also
// restored lazily.
func (b *bench) laterGeneration(r *run, kind string, j *job, store string, common []string) (incremental, error) {
	inc := incremental{Cond: r.Cond, Rep: r.Rep, Kind: kind, Gen1RawBytes: r.RawBytes, Gen1Disk: r.DiskBytes}
	sig := syscall.SIGUSR2
	if kind == "scattered" {
		sig = syscall.SIGWINCH
	}
	changed, err := b.signal(j, sig)
	if err != nil {
		return inc, fmt.Errorf("change the memory: %w", err)
	}
	if changed == j.digest {
		return inc, fmt.Errorf("the workload's digest did not change after %v", sig)
	}
	if kind == "scattered" {
		pages, err := os.ReadFile(j.digestFile() + ".changed")
		if err != nil {
			return inc, err
		}
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			return inc, err
		}
		inc.ChangedBytes, inc.ChangedZstd = int64(len(pages)), int64(len(enc.EncodeAll(pages, nil)))
		enc.Close()
	}
	j.digest = changed
	before, _, err := du(store)
	if err != nil {
		return inc, err
	}
	if err := b.prepare(); err != nil {
		return inc, err
	}
	d, out, rss, err := b.timed(j.dir, "cryo-checkpoint-"+kind, b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--leave-running", strconv.Itoa(j.pid))...)
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
	inc.WallNS, inc.FrozenNS, inc.RawBytes, inc.NewBytes, inc.StoreGrowth, inc.MaxRSS = int64(d), cp.FrozenNS, cp.RawBytes, cp.NewBytes, after-before, rss
	if err := b.check(j, changed, "after leave-running checkpoint"); err != nil {
		return inc, err
	}
	inc.RunningOK = true
	if kind == "scattered" {
		b.logf("%s rep %d cryo generation 2 (0.1%% of pages changed, scattered: %s, %s compressed): %s new, store grew %s; checkpoint %s (frozen %s); memory intact",
			r.Cond, r.Rep, human(inc.ChangedBytes), human(inc.ChangedZstd), human(inc.NewBytes), human(inc.StoreGrowth), secs(inc.WallNS), secs(inc.FrozenNS))
		return inc, nil
	}
	if err := b.kill(j.pid); err != nil {
		return inc, err
	}
	if err := b.prepare(); err != nil {
		return inc, err
	}
	d, out, _, err = b.timed(j.dir, "cryo-restore-lazy", b.cfg.Cryo, append([]string{"restore", "--lazy"}, common...)...)
	if err != nil {
		return inc, err
	}
	var rs cryoRestore
	if err := json.Unmarshal(out, &rs); err != nil {
		return inc, fmt.Errorf("cryo restore output %q: %w", out, err)
	}
	b.track(rs.PID)
	inc.LazyStartNS, inc.LazyWallNS, inc.LazyBytes = rs.MaterializeNS+rs.RestoreNS, int64(d), rs.LazyBytes
	if err := b.check(j, changed, "after restoring generation 3 lazily"); err != nil {
		return inc, err
	}
	inc.RestoreOK = true
	b.logf("%s rep %d cryo generation 3 (5%% changed, contiguous): %s new of %s, store grew %s; checkpoint %s (frozen %s); lazy restore: running after %s, %s served, whole after %s; memory intact while running and after restore",
		r.Cond, r.Rep, human(inc.NewBytes), human(inc.RawBytes), human(inc.StoreGrowth), secs(inc.WallNS), secs(inc.FrozenNS),
		secs(inc.LazyStartNS), human(inc.LazyBytes), secs(inc.LazyWallNS))
	return inc, b.kill(rs.PID)
}

// generationFiles counts the files of a store with one generation but the
// store's own (cryo-store.json, lock): its packs and its manifest.
func generationFiles(store string) (int, error) {
	n := 0
	err := filepath.WalkDir(store, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && p != filepath.Join(store, "cryo-store.json") && p != filepath.Join(store, "lock") {
			n++
		}
		return nil
	})
	return n, err
}

// rssOnly measures cryo's peak resident memory while it checkpoints
// (--kill), restores and checkpoints again (leave-running) a job of each
// size in -rss; the restored job's memory is checked each time.
func (b *bench) rssOnly() error {
	b.cond = condition{Name: "warm", WarmMiB: 0}
	for _, mib := range b.cfg.RSSMiB {
		b.mib = mib
		x := rssRun{MiB: mib}
		j, err := b.startJob(fmt.Sprintf("rss-%d", mib))
		if err != nil {
			return err
		}
		store := filepath.Join(b.cfg.Dir, fmt.Sprintf("rss-store-%d", mib))
		common := []string{"--json", "--criu", b.cfg.CRIU, "--store", store, "--work-dir", b.cfg.ShmDir}
		if err := b.prepare(); err != nil {
			return err
		}
		d, _, rss, err := b.timed(j.dir, "cryo-checkpoint", b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--kill", strconv.Itoa(j.pid))...)
		if err != nil {
			return err
		}
		x.KillNS, x.KillRSS = int64(d), rss
		if err := b.waitGone(j.pid, 30*time.Second); err != nil {
			return err
		}
		if err := b.prepare(); err != nil {
			return err
		}
		d, out, rss, err := b.timed(j.dir, "cryo-restore", b.cfg.Cryo, append([]string{"restore"}, common...)...)
		if err != nil {
			return err
		}
		x.RestoreNS, x.RestoreRSS = int64(d), rss
		var rs cryoRestore
		if err := json.Unmarshal(out, &rs); err != nil {
			return fmt.Errorf("cryo restore output %q: %w", out, err)
		}
		b.track(rs.PID)
		if err := b.check(j, j.digest, "after cryo restore"); err != nil {
			return err
		}
		if err := b.prepare(); err != nil {
			return err
		}
		d, out, rss, err = b.timed(j.dir, "cryo-checkpoint-leave", b.cfg.Cryo, append(append([]string{"checkpoint"}, common...), "--leave-running", strconv.Itoa(j.pid))...)
		if err != nil {
			return err
		}
		var cp cryoCheckpoint
		_ = json.Unmarshal(out, &cp)
		x.LeaveNS, x.LeaveRSS, x.LeaveFrozeNS = int64(d), rss, cp.FrozenNS
		if err := b.check(j, j.digest, "after leave-running checkpoint"); err != nil {
			return err
		}
		if err := b.kill(j.pid); err != nil {
			return err
		}
		os.RemoveAll(store)
		b.res.RSS = append(b.res.RSS, x)
		b.logf("%d MiB job: cryo peak memory: checkpoint --kill %s (%s), restore %s (%s), checkpoint --leave-running %s (%s, frozen %s); memory intact",
			mib, human(x.KillRSS<<10), secs(x.KillNS), human(x.RestoreRSS<<10), secs(x.RestoreNS), human(x.LeaveRSS<<10), secs(x.LeaveNS), secs(x.LeaveFrozeNS))
	}
	if err := b.writeJSON(); err != nil {
		return err
	}
	fmt.Printf("\ncryo's peak resident memory (target <= %d MiB)\n%-8s %22s %14s %26s\n", targetRSSMiB, "job", "checkpoint --kill", "restore", "checkpoint --leave-running")
	for _, x := range b.res.RSS {
		fmt.Printf("%-8s %22s %14s %26s  %s\n", human(int64(x.MiB)<<20), human(x.KillRSS<<10), human(x.RestoreRSS<<10), human(x.LeaveRSS<<10),
			verdict(max(x.KillRSS, x.RestoreRSS, x.LeaveRSS)>>10 <= targetRSSMiB))
	}
	fmt.Printf("\nresults: %s\n", b.cfg.JSONOut)
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "ok"
	}
	return "MISSED"
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

// summarise computes the summary rows and ratios of one half.
func (b *bench) summarise(cond condition) half {
	pick := func(tool string, f func(run) int64) []int64 {
		var v []int64
		for _, r := range b.res.Runs {
			if r.Tool == tool && r.Cond == cond.Name {
				v = append(v, f(r))
			}
		}
		return v
	}
	incs := func(kind string, f func(incremental) int64) []int64 {
		var v []int64
		for _, x := range b.res.Incremental {
			if x.Kind == kind && x.Cond == cond.Name {
				v = append(v, f(x))
			}
		}
		return v
	}
	row := func(name, unit string, v []int64) summaryRow {
		return summaryRow{Name: name, Unit: unit, Min: minOf(v), Median: median(v), Max: maxOf(v), Values: v}
	}
	ckCRIU := row("checkpoint wall: criu dump", "ns", pick("criu", func(r run) int64 { return r.CheckpointNS }))
	ckDurable := row("  criu dump + fsync of its images", "ns", pick("criu", func(r run) int64 { return r.CheckpointNS + r.FsyncNS }))
	ckCryo := row("checkpoint wall: cryo checkpoint --kill", "ns", pick("cryo", func(r run) int64 { return r.CheckpointNS }))
	frCRIU := row("  frozen (criu stats): criu dump", "ns", pick("criu", func(r run) int64 { return r.FrozenNS }))
	byCRIU := row("bytes on disk: criu images", "bytes", pick("criu", func(r run) int64 { return r.DiskBytes }))
	byCryo := row("bytes on disk: cryo store", "bytes", pick("cryo", func(r run) int64 { return r.DiskBytes }))
	rsCRIU := row("restore wall: criu restore -d", "ns", pick("criu", func(r run) int64 { return r.RestoreNS }))
	rsCryo := row("restore wall: cryo restore", "ns", pick("cryo", func(r run) int64 { return r.RestoreNS }))
	raw := row("  cryo raw image bytes", "bytes", pick("cryo", func(r run) int64 { return r.RawBytes }))
	files := row("gen 1: files (packs, manifest)", "count", pick("cryo", func(r run) int64 { return int64(r.Files) }))
	rss := row("cryo peak memory (checkpoint, restore)", "kib", pick("cryo", func(r run) int64 { return max(r.CheckpointRSS, r.RestoreRSS) }))
	if lr := incs("contiguous", func(x incremental) int64 { return x.MaxRSS }); len(lr) == len(rss.Values) {
		for i := range lr {
			rss.Values[i] = max(rss.Values[i], lr[i])
		}
		rss = row("cryo peak memory (any checkpoint, restore)", "kib", rss.Values)
	}
	scGrowth := row("gen 2 (0.1% scattered): store growth", "bytes", incs("scattered", func(x incremental) int64 { return x.StoreGrowth }))
	scZstd := row("  the changed pages, zstd", "bytes", incs("scattered", func(x incremental) int64 { return x.ChangedZstd }))
	coNew := row("gen 3 (5% contiguous): new bytes", "bytes", incs("contiguous", func(x incremental) int64 { return x.NewBytes }))
	coGrowth := row("gen 3 (5% contiguous): store growth", "bytes", incs("contiguous", func(x incremental) int64 { return x.StoreGrowth }))
	incFrozen := row("gen 2, 3: frozen (leave-running)", "ns", append(incs("scattered", func(x incremental) int64 { return x.FrozenNS }), incs("contiguous", func(x incremental) int64 { return x.FrozenNS })...))
	lazyStart := row("gen 3: cryo restore --lazy, job running", "ns", incs("contiguous", func(x incremental) int64 { return x.LazyStartNS }))
	h := half{Condition: cond}
	h.Summary = []summaryRow{
		ckCRIU, ckCryo, ckDurable, frCRIU,
		row("  frozen (reported): cryo --kill", "ns", pick("cryo", func(r run) int64 { return r.FrozenNS })),
		row("  cryo: criu dump inside", "ns", pick("cryo", func(r run) int64 { return r.DumpNS })),
		row("  cryo: durable (reported)", "ns", pick("cryo", func(r run) int64 { return r.DurableNS })),
		byCRIU, byCryo,
		row("  apparent bytes: criu images", "bytes", pick("criu", func(r run) int64 { return r.ApparentBytes })),
		row("  apparent bytes: cryo store", "bytes", pick("cryo", func(r run) int64 { return r.ApparentBytes })),
		raw, files,
		rsCRIU, rsCryo,
		row("  cryo: materialize", "ns", pick("cryo", func(r run) int64 { return r.MaterializeNS })),
		row("  cryo: criu restore inside", "ns", pick("cryo", func(r run) int64 { return r.CRIURestoreNS })),
		row("peak memory: criu dump", "kib", pick("criu", func(r run) int64 { return r.CheckpointRSS })),
		row("peak memory: criu restore", "kib", pick("criu", func(r run) int64 { return r.RestoreRSS })),
		row("peak memory: cryo checkpoint --kill", "kib", pick("cryo", func(r run) int64 { return r.CheckpointRSS })),
		row("peak memory: cryo restore", "kib", pick("cryo", func(r run) int64 { return r.RestoreRSS })),
		row("peak memory: cryo checkpoint --leave-running", "kib", incs("contiguous", func(x incremental) int64 { return x.MaxRSS })),
		scGrowth, scZstd,
		row("gen 2 (0.1% scattered): new bytes", "bytes", incs("scattered", func(x incremental) int64 { return x.NewBytes })),
		row("gen 2: checkpoint wall (leave-running)", "ns", incs("scattered", func(x incremental) int64 { return x.WallNS })),
		coNew, coGrowth,
		row("gen 3: checkpoint wall (leave-running)", "ns", incs("contiguous", func(x incremental) int64 { return x.WallNS })),
		incFrozen,
		lazyStart,
		row("gen 3: cryo restore --lazy, memory whole", "ns", incs("contiguous", func(x incremental) int64 { return x.LazyWallNS })),
	}
	mk := func(name string, num, den summaryRow, target float64) ratio {
		r := ratio{Name: name, Median: num.Median / den.Median, Min: num.Min / den.Min, Max: num.Max / den.Max, Target: target}
		if target > 0 {
			ok := r.Median <= target
			r.MeetsGoal = &ok
		}
		return r
	}
	// Per-repetition ratios (the two sides come from the same round).
	perRep := func(name string, num, den []int64, scale, target float64, unit string) ratio {
		var v []int64
		for i := range min(len(num), len(den)) {
			if den[i] > 0 {
				v = append(v, int64(float64(num[i])/float64(den[i])*scale*1e6))
			}
		}
		r := ratio{Name: name, Median: median(v) / 1e6, Min: minOf(v) / 1e6, Max: maxOf(v) / 1e6, Target: target, Unit: unit}
		ok := r.Median <= target
		r.MeetsGoal = &ok
		return r
	}
	gib := float64(1 << 30)
	h.Ratios = []ratio{
		mk("cryo checkpoint --kill / criu dump + fsync (wall)", ckCryo, ckDurable, targetDurable),
		mk("cryo checkpoint --kill / criu dump (wall)", ckCryo, ckCRIU, 0),
		mk("cryo restore / criu restore (wall)", rsCryo, rsCRIU, targetRestore),
		mk("cryo bytes / criu bytes (on disk)", byCryo, byCRIU, targetBytes),
		perRep("gen 1 files per GiB of its images", pick("cryo", func(r run) int64 { return int64(r.Files) }),
			pick("cryo", func(r run) int64 { return r.RawBytes }), gib, targetFilesPerGiB, "files"),
		perRep("gen 2 (0.1% scattered) growth / its pages zstd", scGrowth.Values, scZstd.Values, 1, targetScattered, ""),
		perRep("gen 2 (0.1% scattered) growth / gen 1 on disk", scGrowth.Values, incs("scattered", func(x incremental) int64 { return x.Gen1Disk }), 1, targetScatteredGen1, ""),
		perRep("gen 3 (5% contiguous) new bytes / gen 1 raw", coNew.Values, incs("contiguous", func(x incremental) int64 { return x.Gen1RawBytes }), 1, targetContiguous, ""),
		mk("frozen: cryo leave-running / criu dump", incFrozen, frCRIU, targetFrozen),
		mk("cryo lazy restore, running / criu restore (wall)", lazyStart, rsCRIU, targetLazyStart),
	}
	rr := ratio{Name: fmt.Sprintf("cryo peak memory, %d MiB job", b.mib), Median: rss.Median / 1024, Min: rss.Min / 1024, Max: rss.Max / 1024,
		Target: targetRSSMiB, Unit: "MiB"}
	ok := rr.Median <= targetRSSMiB && rr.Max <= targetRSSMiB
	rr.MeetsGoal = &ok
	h.Ratios = append(h.Ratios, rr)
	return h
}

func (b *bench) report(w io.Writer) {
	c := b.cfg
	fmt.Fprintf(w, "\ncryo vs raw CRIU %s: %d MiB workload (20%% random, 30%% zero pages, 50%% structured), %d reps each, alternating\n",
		b.res.CRIUVersion, c.MiB, c.Reps)
	fmt.Fprintf(w, "host %s, kernel %s, %d CPUs; load average before %s, after %s\n",
		b.res.Host, b.res.Kernel, b.res.CPUs, b.res.LoadBefore, b.res.LoadAfter)
	fmt.Fprintf(w, "every restore verified: the workload's memory digest equals the one taken before the checkpoint\n")
	for _, h := range b.res.Halves {
		fmt.Fprintf(w, "\n== %s: %s\n\n", h.Condition.Name, h.Condition)
		fmt.Fprintf(w, "%-46s %12s %12s %12s   %s\n", "", "min", "median", "max", "all")
		for _, r := range h.Summary {
			var all []string
			for _, v := range r.Values {
				all = append(all, format(r.Unit, float64(v)))
			}
			fmt.Fprintf(w, "%-46s %12s %12s %12s   %s\n", r.Name, format(r.Unit, r.Min), format(r.Unit, r.Median), format(r.Unit, r.Max), strings.Join(all, " "))
		}
		fmt.Fprintf(w, "\n%-52s %9s %9s %9s %11s\n", "target ("+h.Condition.Name+")", "median", "min", "max", "target")
		for _, r := range h.Ratios {
			target := ""
			v := ""
			if r.MeetsGoal != nil {
				target = fmt.Sprintf("<= %g%s", r.Target, unitSuffix(r.Unit))
				v = verdict(*r.MeetsGoal)
			}
			fmt.Fprintf(w, "%-52s %9s %9s %9s %11s  %s\n", r.Name, ratioText(r.Median, r.Unit), ratioText(r.Min, r.Unit), ratioText(r.Max, r.Unit), target, v)
		}
	}
	fmt.Fprintf(w, "\nresults: %s\n", c.JSONOut)
}

func unitSuffix(unit string) string {
	switch unit {
	case "":
		return "x"
	case "files":
		return ""
	}
	return " " + unit
}

func ratioText(v float64, unit string) string {
	switch unit {
	case "":
		if v < 0.1 {
			return fmt.Sprintf("%.4fx", v)
		}
		return fmt.Sprintf("%.2fx", v)
	case "files":
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.0f %s", v, unit)
}

func maxOf(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	return float64(slices.Max(v))
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
	cmd := exec.Command(b.cfg.Workload, "-mib", strconv.Itoa(b.mib), "-digest", j.digestFile())
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
	if b.mib != b.cfg.MiB {
		// an -rss job of another size
	} else if b.res.Digest == "" {
		b.res.Digest = j.digest
	} else if j.digest != b.res.Digest {
		return nil, fmt.Errorf("workload pid %d filled its memory differently (%s, before %s)", j.pid, j.digest, b.res.Digest)
	}
	return j, nil
}

func (b *bench) fillTimeout() time.Duration {
	return 2*time.Minute + time.Duration(b.mib)*100*time.Millisecond
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

// timed runs one tool command and returns its wall time, its stdout and
// its peak resident memory (KiB). Its stderr goes to
// a log in logDir, whose end is shown when it fails.
func (b *bench) timed(logDir, name, bin string, args ...string) (time.Duration, []byte, int64, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.fillTimeout()+5*time.Minute)
	defer cancel()
	logPath := filepath.Join(logDir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return 0, nil, 0, err
	}
	defer logf.Close()
	var stdout bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, logf
	// Interrupted CRIU unwinds on SIGTERM (and thaws what it froze).
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	t0 := time.Now()
	if err = cmd.Start(); err != nil {
		return 0, nil, 0, err
	}
	// The tool's own peak resident memory: its VmHWM, read until it exits
	// (wait4's ru_maxrss would count the bench's own high-water mark,
	// which an exec'd child inherits, and the tool's children).
	stop := make(chan struct{})
	hwm := make(chan int64, 1)
	go func() {
		var peak int64
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			if v := vmHWM(cmd.Process.Pid); v > peak {
				peak = v
			}
			select {
			case <-stop:
				hwm <- peak
				return
			case <-tick.C:
			}
		}
	}()
	err = cmd.Wait()
	d := time.Since(t0)
	close(stop)
	rss := <-hwm
	if err != nil {
		log, _ := os.ReadFile(logPath)
		return d, nil, rss, fmt.Errorf("%s %s: %w\n--- stdout:\n%s--- end of its log (%s):\n%s", filepath.Base(bin),
			strings.Join(args, " "), err, stdout.String(), logPath, tail(string(log), 3000))
	}
	return d, stdout.Bytes(), rss, nil
}

// vmHWM is the peak resident memory (KiB) of a running process, 0 when it
// cannot be read (the process is gone).
func vmHWM(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}

// condition is how every timed step of one half of the bench starts.
type condition struct {
	Name    string        `json:"name"` // "warm" or "cold"
	WarmMiB int           `json:"warm_mib"`
	Settle  time.Duration `json:"settle_ns"`
}

func (c condition) String() string {
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
	if b.cond.Settle > 0 {
		select {
		case <-time.After(b.cond.Settle):
		case <-b.ctx.Done():
			return b.ctx.Err()
		}
	}
	if b.cond.WarmMiB == 0 {
		return nil
	}
	t0 := time.Now()
	mem, err := unix.Mmap(-1, 0, b.cond.WarmMiB<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
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
	switch unit {
	case "bytes":
		return human(int64(v))
	case "kib":
		return human(int64(v) << 10)
	case "count":
		return strconv.Itoa(int(v))
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
