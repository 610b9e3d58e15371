package monitor

import (
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/offload"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
)

// Config describes one supervised job: the one definition of a job that
// `cryo run` fills from its flags. Every field is honoured.
type Config struct {
	Name  string     // job name in metrics, events and the control socket
	Store string     // the job's store; its run/ directory holds logs and state
	Trees []TreeSpec // exactly one is the host
	// Interval between periodic checkpoints; 0 disables them (signals and
	// the control socket can still ask for one).
	Interval time.Duration
	// AutoInterval recomputes the interval from the measured checkpoint
	// cost and MTBF with Daly's formula.
	AutoInterval bool
	MTBF         time.Duration
	// MaxRestarts bounds how many times a failed job is brought back.
	MaxRestarts int
	// RestartOnExit makes a plain non-zero exit of the host tree (not
	// 128+N, which reports a process killed by signal N: a crash) a failure
	// to restore from; without it the exit code is the job's answer and
	// passes straight through (see judgeEnd).
	RestartOnExit bool
	// HeartbeatTimeout, when set, declares the job failed if the file named
	// by $CRYO_HEARTBEAT_FILE (which the job touches) stops changing for
	// this long, by the supervisor's own clock.
	HeartbeatTimeout time.Duration
	// HangTimeout, when set, declares an offload tree hung if it uses no
	// CPU for this long.
	HangTimeout time.Duration
	// ChannelGrace is how long a broken channel between two trees of the
	// job may last before it counts as a failure (default 3 s); negative
	// turns the channel watcher off.
	ChannelGrace time.Duration
	// Grace between SIGTERM and SIGKILL of what is left of the job (the
	// offload trees, processes left behind) when the host tree ends
	// (default 5 s).
	Grace time.Duration
	// Keep is how many generations that may be restored are kept (0: all);
	// see retain for what is kept besides.
	Keep int
	// Fresh starts the job from scratch even if the store holds a
	// checkpoint of an unfinished run.
	Fresh bool
	// Namespaces gives the job PID, IPC and mount namespaces of its own
	// (for a user, owned by a user namespace of theirs): a private /proc,
	// /dev/shm and TMPDIR that its checkpoints hold, and PIDs that cannot
	// collide when it is restored (internal/jobns).
	Namespaces bool
	// Backoff before the first restore; doubled per consecutive failure, up
	// to 30 s (default 1 s).
	Backoff time.Duration
	// RepeatWindow is how soon after a restore a failure of the same kind
	// passes over the restored generation for an older one (default 1 min,
	// or two intervals when that is longer), if no checkpoint was taken
	// meanwhile.
	RepeatWindow time.Duration
	CRIU         criu.Binary
	// GhostLimit and CRIUConfig reach every checkpoint (both) and restore
	// (the configuration) of the job: checkpoint.Options' fields.
	GhostLimit uint32
	CRIUConfig string
	// PackSize is checkpoint.Options.PackSize for every checkpoint of the
	// job, and the bound of the packs retention's GC writes (0: 256 MiB).
	PackSize   int64
	CheckCache string
	WorkDir    string
	// Replica is a second store that every checkpoint is copied to and
	// restores heal damaged chunks from (checkpoint.Options.Replica).
	Replica string
	// Self is the cryo binary that runs job-init ("cryo job-init");
	// default /proc/self/exe.
	Self    string
	Logger  *slog.Logger
	Metrics *Metrics
	// Offload drives the job's offload contexts in every checkpoint and
	// restore; the caller opened it once and closes it (nil: each opens
	// and closes its own).
	Offload *offload.Registry
	// Health reports critical GPU errors affecting the job's processes
	// (NVML Xid events); nil when the node has no GPUs.
	Health HealthSource
	// OnEvent, if set, is called for every Event (from the supervisor's
	// goroutine; keep it quick).
	OnEvent func(Event)
	// JobDir is the directory of the job's own files, when not this
	// store's run directory: a job migrated here keeps using the one of the
	// store it was started with (its processes hold those paths).
	JobDir string
	// Standby is a node kept up to date with every generation of the job
	// (cryo run --standby): if this node goes silent, the job resumes there.
	Standby *StandbyConfig
	// TakeOver resumes the job from the store's newest generation even
	// without a run state of it here: a standby whose source was lost.
	TakeOver bool
	// Adopt runs a job that migrated here (cryo run --receive): its
	// generation in Store is restored first, and the source is told when
	// the job runs and once it has lived through Adopt.Grace.
	Adopt *Adopt
	// Engine does the work the supervisor decides on; nil: CRIU through
	// the checkpoint and restore packages (tests inject their own).
	Engine Engine
}

// StandbyConfig names a standby node: where its cryo run --receive
// listens, and the key file both hold.
type StandbyConfig struct {
	Addr    string
	KeyFile string
}

// HealthSource reports device failures for a set of PIDs.
type HealthSource interface {
	// Critical returns descriptions of critical errors (e.g. "Xid 79 on
	// GPU-…") that hit the job since the last call.
	Critical(pids []int) []string
}

// RunDir is where a job's logs, events and state live inside its store.
func RunDir(storeDir string) string { return filepath.Join(storeDir, "run") }

// jobDir is the directory of the files the job itself uses (job-init's
// events and log, the heartbeat, its TMPDIR's mountpoint): the store's run
// directory, or for a job migrated here the one it was started with.
func (cfg *Config) jobDir() string {
	if cfg.JobDir != "" {
		return cfg.JobDir
	}
	return RunDir(cfg.Store)
}

// check validates cfg and fills in defaults.
func (cfg *Config) check() error {
	if cfg.Store == "" {
		return errors.New("no store given")
	}
	hosts := 0
	for i, t := range cfg.Trees {
		if len(t.Argv) == 0 {
			return fmt.Errorf("tree %d (%s) has no command", i, t.Name)
		}
		if t.Host {
			hosts++
		}
	}
	if hosts != 1 {
		return fmt.Errorf("a job needs exactly one host tree, got %d", hosts)
	}
	if cfg.AutoInterval && cfg.MTBF <= 0 {
		return errors.New("--interval auto needs --mtbf")
	}
	if cfg.MaxRestarts < 0 || cfg.Keep < 0 || cfg.Interval < 0 || cfg.HeartbeatTimeout < 0 || cfg.HangTimeout < 0 || cfg.Grace < 0 {
		return errors.New("restarts, keep, interval, timeouts and grace must not be negative")
	}
	if cfg.Name == "" {
		cfg.Name = "job"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.ChannelGrace == 0 {
		cfg.ChannelGrace = 3 * time.Second
	}
	if cfg.Grace == 0 {
		cfg.Grace = 5 * time.Second
	}
	if cfg.Backoff == 0 {
		cfg.Backoff = time.Second
	}
	if cfg.RepeatWindow == 0 {
		cfg.RepeatWindow = max(time.Minute, 2*cfg.Interval)
	}
	if cfg.Self == "" {
		cfg.Self = "/proc/self/exe"
	}
	return nil
}
