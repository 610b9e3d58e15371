package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/jobns"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/migrate"
	"github.com/cryo-hpc/cryo/monitor"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
	ucli "github.com/urfave/cli/v2"
)

type runOpts struct {
	common
	store        string
	offload      ucli.StringSlice
	interval     string
	mtbf         time.Duration
	maxRestarts  int
	heartbeat    time.Duration
	hang         time.Duration
	channelGrace time.Duration
	grace        time.Duration
	keep         int
	control      string
	metricsAddr  string
	fresh        bool
	stdout       string
	stderr       string
	workDir      string
	replica      string
	restartExit  bool
	namespaces   string
	// Slurm and signals (cli/slurm.go).
	storeRoot  string
	requeue    bool
	ckptSignal string
	startOver  bool
	limits     criuLimits
	// A job migrated here (cli/receive.go).
	receive    string
	key        string
	adoptGrace time.Duration
	standby    string
	packSize   string
}

func runCommand(e *env) *ucli.Command {
	o := &runOpts{}
	return &ucli.Command{
		Name:      "run",
		Usage:     "run a job (host tree plus --offload trees) under cryo's protection: periodic checkpoints, failure detection, restore",
		ArgsUsage: "-- HOSTCMD [ARGS...]",
		Description: `The job's trees run under one job-init process, so one checkpoint captures
all of them with the channels between them. SIGUSR1 checkpoints now;
SIGTERM or SIGINT checkpoints and stops the job (exit 143). When the job
crashes (a signal kills the host tree or job-init, or the host exits with
128+N, which is how shells and MPI launchers report a process of theirs, a
rank, killed by signal N), a link between its trees breaks, or it hangs, cryo ends every process of the job and restores the
newest checkpoint taken before the failure began. A plain non-zero exit of
the host tree is the job's answer: cryo exits with it at once (unless
--restart-on-exit). Run again with the same store to resume an unfinished job.

The host's stdout goes to cryo's stdout when that is a file of its own, else
to STORE/run/host.out, relayed to cryo's stdout. Its stderr goes to
STORE/run/host.err (or --stderr), and is relayed to cryo's stderr with each
line prefixed "host: ", so that cryo's own messages ("cryo: ...") stand apart.
After a restore these files, and the files the job writes itself, are cut
back to where they were at the checkpoint, so the output appears once.

In a Slurm batch job --store defaults to STORE-ROOT/cryo-$SLURM_JOB_ID, which
survives requeues. With --requeue, the checkpoint signal (sbatch
--signal=B:USR1@300) checkpoints and stops the job and requeues it; when
Slurm runs the script again, cryo resumes the job. Start cryo with exec, so
that the signal reaches it (docs/slurm.md).`,
		Flags: append(append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory for the job's checkpoints and logs (default in a Slurm job: STORE-ROOT/cryo-$SLURM_JOB_ID)", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}},
			&ucli.StringSliceFlag{Name: "offload", Usage: "an offload tree's command line (repeatable)", Destination: &o.offload},
			&ucli.StringFlag{Name: "interval", Usage: "time between checkpoints (e.g. 10m), 'auto' (needs --mtbf), or 0 for none", Value: "0", Destination: &o.interval, EnvVars: []string{"CRYO_INTERVAL"}},
			&ucli.DurationFlag{Name: "mtbf", Usage: "mean time between failures, for --interval auto", Destination: &o.mtbf, EnvVars: []string{"CRYO_MTBF"}},
			&ucli.IntFlag{Name: "max-restarts", Usage: "restores before giving up", Value: 3, Destination: &o.maxRestarts, EnvVars: []string{"CRYO_MAX_RESTARTS"}},
			&ucli.DurationFlag{Name: "heartbeat-timeout", Usage: "fail the job when $CRYO_HEARTBEAT_FILE, which it touches, is older than this (0: off)", Destination: &o.heartbeat},
			&ucli.DurationFlag{Name: "hang-timeout", Usage: "fail the job when an offload tree uses no CPU for this long (0: off)", Destination: &o.hang},
			&ucli.DurationFlag{Name: "channel-grace", Usage: "how long a broken host-offload channel may last before it counts as a failure (negative: don't watch)", Value: 3 * time.Second, Destination: &o.channelGrace},
			&ucli.DurationFlag{Name: "grace", Usage: "when the host ends, time the offload trees get between SIGTERM and SIGKILL", Value: 5 * time.Second, Destination: &o.grace},
			&ucli.IntFlag{Name: "keep", Usage: "generations to keep", Value: 3, Destination: &o.keep, EnvVars: []string{"CRYO_KEEP"}},
			&ucli.StringFlag{Name: "control", Usage: "control socket path (default: STORE/run/control.sock)", Destination: &o.control},
			&ucli.StringFlag{Name: "metrics-addr", Usage: "serve Prometheus metrics on this address (e.g. 127.0.0.1:9400)", Destination: &o.metricsAddr},
			&ucli.BoolFlag{Name: "fresh", Usage: "start from scratch even if the store holds a checkpoint of an unfinished run", Destination: &o.fresh},
			&ucli.StringFlag{Name: "stdout", Usage: "file the host tree's stdout is appended to (default: cryo's stdout if it is a file of its own, else STORE/run/host.out relayed to cryo's stdout)", Destination: &o.stdout},
			&ucli.StringFlag{Name: "stderr", Usage: "file the host tree's stderr is appended to (default: STORE/run/host.err, relayed to cryo's stderr as lines prefixed \"host: \")", Destination: &o.stderr},
			&ucli.StringFlag{Name: "work-dir", Usage: "where images wait between CRIU and the store", Destination: &o.workDir, EnvVars: []string{"CRYO_WORK_DIR"}},
			&ucli.StringFlag{Name: "replica", Usage: "copy every checkpoint to this second store too, and heal damaged chunks from it on restore (a failing replica is logged, the checkpoint kept)", Destination: &o.replica, EnvVars: []string{"CRYO_REPLICA"}},
			&ucli.StringFlag{Name: "namespaces", Usage: "give the job PID, IPC and mount namespaces of its own (private /proc, /dev/shm and TMPDIR, held by its checkpoints; PIDs that cannot collide on restore): auto (when the node allows it), on, or off", Value: "auto", Destination: &o.namespaces, EnvVars: []string{"CRYO_NAMESPACES"}},
			&ucli.BoolFlag{Name: "restart-on-exit", Usage: "take a non-zero exit of the host tree for a failure and restore the job (default: the exit code is the job's answer and passes through)", Destination: &o.restartExit, EnvVars: []string{"CRYO_RESTART_ON_EXIT"}},
			&ucli.StringFlag{Name: "store-root", Usage: "in a Slurm job without --store: where the per-job store cryo-$SLURM_JOB_ID goes (default: $SLURM_SUBMIT_DIR)", Destination: &o.storeRoot, EnvVars: []string{"CRYO_STORE_ROOT"}},
			&ucli.StringFlag{Name: "checkpoint-signal", Usage: "signal that checkpoints the job now (with --requeue: checkpoints, stops and requeues it); when another is named, SIGUSR1 still takes a plain checkpoint", Value: "USR1", Destination: &o.ckptSignal, EnvVars: []string{"CRYO_CHECKPOINT_SIGNAL"}},
			&ucli.BoolFlag{Name: "requeue", Usage: "in a Slurm batch job: on the checkpoint signal, checkpoint, stop and requeue the job (scontrol requeue); when it runs again it resumes (see docs/slurm.md)", Destination: &o.requeue, EnvVars: []string{"CRYO_REQUEUE"}},
			&ucli.StringFlag{Name: "receive", Usage: "take a job that `cryo migrate` moves here: listen on this address (host:port) for it, then run it as cryo run does", Destination: &o.receive},
			&ucli.StringFlag{Name: "key", Usage: "with --receive: the pre-shared key file that authenticates the source (cryo keygen makes one)", Destination: &o.key, EnvVars: []string{"CRYO_MIGRATE_KEY"}},
			packSizeFlag(&o.packSize),
			&ucli.StringFlag{Name: "standby", Usage: "keep a standby node up to date: send every checkpoint (only what it lacks) to the cryo run --receive listening at this host:port; if this node goes silent, the job resumes there", Destination: &o.standby, EnvVars: []string{"CRYO_STANDBY"}},
			&ucli.DurationFlag{Name: "adopt-grace", Usage: "with --receive: how long the migrated job must run here before its source lets it go", Value: 5 * time.Second, Destination: &o.adoptGrace},
			&ucli.BoolFlag{Name: "start-over", Usage: "when resuming and no checkpoint of the store is intact, start the job from the beginning instead of failing (verifies the store first)", Destination: &o.startOver, EnvVars: []string{"CRYO_START_OVER"}},
		), o.limits.flags(true)...),
		Action: func(c *ucli.Context) error {
			switch {
			case o.receive != "" && c.NArg() > 0:
				return usagef("--receive takes the job from the migration: give no command")
			case o.receive == "" && c.NArg() == 0:
				return usagef("run needs the host command after --")
			case o.receive != "" && o.standby != "":
				return usagef("--standby is for the job's own node, not with --receive")
			case (o.receive != "" || o.standby != "") && o.key == "":
				return usagef("--receive and --standby need --key (the key file the other node holds too)")
			case o.receive == "" && o.standby == "" && o.key != "":
				return usagef("--key is for --receive and --standby")
			}
			cfg, err := o.config(c, e)
			if err != nil {
				return err
			}
			sigplan, err := o.slurmSetup(e)
			if err != nil {
				return err
			}
			return o.run(c, e, cfg, sigplan)
		},
	}
}

// config turns the flags into the job's definition. Every flag is
// honoured; one that cannot be is refused, never dropped.
func (o *runOpts) config(c *ucli.Context, e *env) (monitor.Config, error) {
	cfg := monitor.Config{
		Name: "job", MaxRestarts: o.maxRestarts, RestartOnExit: o.restartExit, HeartbeatTimeout: o.heartbeat,
		HangTimeout: o.hang, ChannelGrace: o.channelGrace, Grace: o.grace, Keep: o.keep,
		Fresh: o.fresh, CheckCache: checkCache, WorkDir: o.workDir, Replica: o.replica, Logger: o.logger(e),
		Metrics: &monitor.Metrics{},
	}
	switch {
	case o.interval == "auto":
		if o.mtbf <= 0 {
			return cfg, usagef("--interval auto needs --mtbf (e.g. --mtbf 24h)")
		}
		cfg.AutoInterval, cfg.MTBF = true, o.mtbf
		// Until a checkpoint has been measured, assume it costs 1 s.
		cfg.Interval = monitor.DalyInterval(time.Second, o.mtbf)
	default:
		d, err := time.ParseDuration(o.interval)
		if err != nil && o.interval != "0" {
			return cfg, usagef("--interval: %q is not a duration or 'auto'", o.interval)
		}
		if d < 0 {
			return cfg, usagef("--interval must not be negative")
		}
		if c.IsSet("mtbf") {
			return cfg, usagef("--mtbf is for --interval auto")
		}
		cfg.Interval = d
	}
	switch {
	case o.maxRestarts < 0 || o.keep < 0:
		return cfg, usagef("--max-restarts and --keep must be >= 0")
	case o.heartbeat < 0 || o.hang < 0 || o.grace < 0:
		return cfg, usagef("--heartbeat-timeout, --hang-timeout and --grace must be >= 0")
	case o.hang > 0 && len(o.offload.Value()) == 0:
		return cfg, usagef("--hang-timeout watches offload trees: the job has none (--offload)")
	case c.IsSet("channel-grace") && len(o.offload.Value()) == 0:
		return cfg, usagef("--channel-grace watches channels between the job's trees: the job has one (--offload adds more)")
	}
	var err error
	if cfg.GhostLimit, cfg.CRIUConfig, err = o.limits.parse(); err != nil {
		return cfg, err
	}
	if cfg.PackSize, err = parsePackSize(o.packSize); err != nil {
		return cfg, err
	}
	switch o.namespaces {
	case "off":
	case "on", "auto":
		err := jobns.Probe(!privilege.Root())
		switch {
		case err == nil:
			cfg.Namespaces = true
		case o.namespaces == "on":
			return cfg, err
		default:
			fmt.Fprintf(e.stderr, "cryo: warning: %v: the job runs without namespaces of its own, so the PIDs it has must be free when it is restored\n", err)
		}
	default:
		return cfg, usagef("--namespaces: %q is not auto, on or off", o.namespaces)
	}
	if o.keep == 1 {
		// With one generation kept, a checkpoint that does not restore
		// leaves nothing to fall back on.
		fmt.Fprintln(e.stderr, "cryo: warning: --keep 1 leaves no older checkpoint to fall back on")
	}
	return cfg, nil
}

// run supervises the job here until it ends, and exits with its code.
func (o *runOpts) run(c *ucli.Context, e *env, cfg monitor.Config, sigplan *runSignals) error {
	bin, err := o.locateCRIU(e)
	if err != nil {
		return err
	}
	cfg.CRIU = bin
	abs, err := filepath.Abs(o.store)
	if err != nil {
		return err
	}
	cfg.Store = abs
	if _, err := store.Create(abs, "cryo "+checkpoint.Version); err != nil {
		return err
	}
	run := monitor.RunDir(abs)
	if err := os.MkdirAll(run, 0o700); err != nil {
		return err
	}
	hostOut, relayOut := stdoutFor(o.stdout, os.Stdout, os.Stderr, filepath.Join(run, "host.out"))
	hostErr, relayErr := filepath.Join(run, "host.err"), filepath.Join(run, "host.err")
	if o.stderr != "" {
		hostErr, _ = filepath.Abs(o.stderr)
		relayErr = ""
	}
	var incoming *migrate.Incoming
	if o.receive != "" {
		// The job comes from another node: its trees are the source's,
		// and their output files are where the source had them.
		in, stop, err := o.receiveJob(c.Context, e, cfg)
		if err != nil {
			return err
		}
		defer stop()
		incoming = in
		if cfg.Trees, cfg.JobDir, err = monitor.Adopted(in); err != nil {
			_ = in.Fail(err)
			return err
		}
		switch {
		case in.Standby && in.SourceLost == nil:
			fmt.Fprintf(e.stderr, "cryo: the job is over at its source: nothing to take over (generation %d is in %s)\n", in.Generation, abs)
			return nil
		case in.Standby:
			fmt.Fprintf(e.stderr, "cryo: taking the job over from generation %d: %v\n", in.Generation, in.SourceLost)
			cfg.TakeOver = true
		default:
			cfg.Adopt = &monitor.Adopt{In: in, Grace: o.adoptGrace}
		}
		relayOut, relayErr = "", ""
		for _, t := range cfg.Trees {
			if t.Host {
				relayOut, relayErr = relayable(t.Stdout), relayable(t.Stderr)
			}
		}
	} else {
		cfg.Trees = []monitor.TreeSpec{{Name: "host", Argv: c.Args().Slice(), Host: true, Stdout: hostOut, Stderr: hostErr, Dir: mustGetwd()}}
	}
	if o.standby != "" {
		key, err := filepath.Abs(o.key)
		if err != nil {
			return err
		}
		cfg.Standby = &monitor.StandbyConfig{Addr: o.standby, KeyFile: key}
	}
	for i, cmd := range o.offload.Value() {
		if incoming != nil {
			return usagef("--offload: a migrated job brings its own trees")
		}
		argv, err := splitCommand(cmd)
		if err != nil || len(argv) == 0 {
			return usagef("--offload %q: %v", cmd, err)
		}
		name := fmt.Sprintf("offload-%d", i+1)
		cfg.Trees = append(cfg.Trees, monitor.TreeSpec{Name: name, Argv: argv, Dir: mustGetwd(),
			Stdout: filepath.Join(run, name+".out"), Stderr: filepath.Join(run, name+".err")})
	}
	var msgs sync.Mutex // cryo's messages and the relayed stderr, a line at a time
	jsonEvents := o.json
	// The relay stops at a migration's stop (the job may run on elsewhere)
	// and goes on if it fails. It starts after the supervisor is made and
	// before it runs, and these events come from the supervisor's run.
	var holdRelay func(bool)
	cfg.OnEvent = func(ev monitor.Event) {
		if ev.Kind == "migration-stopped" || ev.Kind == "migrate-failed" {
			holdRelay(ev.Kind == "migration-stopped")
		}
		msgs.Lock()
		defer msgs.Unlock()
		if jsonEvents {
			fmt.Fprintf(e.stderr, "%s\n", mustJSON(ev))
			return
		}
		if line := eventLine(ev); line != "" {
			fmt.Fprintf(e.stderr, "cryo: %s\n", line)
		}
	}
	if err := o.startOverCheck(c.Context, e, &cfg); err != nil {
		return err
	}
	// GPU health: Xid errors on the job's GPUs are failures. A node
	// without NVML has no GPUs to watch.
	// The node's offload drivers, opened once for the whole run: every
	// checkpoint and restore uses them, and GPU health watches the same NVML.
	reg := o.common.offload(e)
	defer reg.Close()
	cfg.Offload = reg
	health, closeHealth := gpuHealth(context.WithoutCancel(c.Context), reg, cfg.Logger)
	defer closeHealth()
	cfg.Health = health
	sup, err := monitor.New(cfg)
	if err != nil {
		return usagef("%v", err)
	}

	// Signals are ours to interpret: the job must outlive a SIGTERM
	// long enough to be checkpointed.
	ctx, cancel := context.WithCancel(context.WithoutCancel(c.Context))
	defer cancel()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, sigplan.notify()...)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			op := sigplan.op(s)
			go func() {
				if _, err := sup.Request(ctx, op); err != nil {
					sigplan.failed(e, s, op, err)
				}
			}()
		}
	}()
	ctl := o.control
	if ctl == "" {
		ctl = filepath.Join(run, "control.sock")
	}
	ctlCtx, stopCtl := context.WithCancel(ctx)
	ctlDone := make(chan struct{})
	go func() {
		defer close(ctlDone)
		if err := monitor.ServeControl(ctlCtx, ctl, sup, cfg.Logger); err != nil {
			msgs.Lock()
			fmt.Fprintf(e.stderr, "cryo: warning: no control socket: %v\n", err)
			msgs.Unlock()
		}
	}()
	defer func() { stopCtl(); <-ctlDone }() // it removes the socket
	stopMetrics, err := serveMetrics(o.metricsAddr, cfg.Metrics)
	if err != nil {
		return err
	}
	defer stopMetrics()
	var stopRelay func()
	stopRelay, holdRelay = relay(ctx, relayOut, e.stdout, relayErr, lockedWriter{&msgs, e.stderr})
	code, err := sup.Run(ctx)
	stopRelay()
	code, err = sigplan.afterRun(ctx, e, sup, code, err)
	if err != nil {
		return exitError{code: max(code, 1), err: err}
	}
	if code != 0 {
		return exitError{code: code}
	}
	return nil
}

// eventLine is how cryo run reports an event (after "cryo: "), or "" for
// one it does not print: the give-up is the error cryo exits with.
func eventLine(ev monitor.Event) string {
	switch ev.Kind {
	case "gave-up":
		return ""
	case "checkpoint":
		if r := ev.Checkpoint; r != nil {
			return fmt.Sprintf("checkpoint: generation %d: %d processes, %s of images, %s new in the store; frozen %s, durable after %s",
				r.Generation, r.Processes, human(r.RawBytes), human(r.NewBytes), r.Frozen.Round(time.Millisecond), r.Durable.Round(time.Millisecond))
		}
	}
	return ev.Kind + ": " + ev.Detail
}

// lockedWriter writes to w under mu.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// exitError carries the job's own exit code out of `cryo run`.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("job exited with code %d", e.code)
	}
	return e.err.Error()
}

// stdoutFor decides where the host's stdout goes: an explicit file; cryo's
// own stdout when that is a regular file of its own (a batch job's output,
// which the restored job then keeps appending to), not shared with cryo's
// stderr (a restore cuts the job's output back to the checkpoint, and must
// not cut cryo's messages with it); else a file in the store that cryo
// relays. It returns the path for the job and the path to relay ("" none).
func stdoutFor(explicit string, own, ownErr *os.File, fallback string) (string, string) {
	if explicit != "" {
		abs, _ := filepath.Abs(explicit)
		return abs, ""
	}
	var st, est syscall.Stat_t
	if syscall.Fstat(int(own.Fd()), &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFREG {
		shared := syscall.Fstat(int(ownErr.Fd()), &est) == nil && est.Dev == st.Dev && est.Ino == st.Ino
		if p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", own.Fd())); err == nil && !shared && filepath.IsAbs(p) && !strings.HasSuffix(p, " (deleted)") {
			return p, ""
		}
	}
	return fallback, fallback
}

func mustGetwd() string {
	d, _ := os.Getwd()
	return d
}

// splitCommand splits a command line like a shell would for words: spaces
// separate, single and double quotes group, backslash escapes.
func splitCommand(s string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord := false
	var quote rune
	esc := false
	for _, r := range s {
		switch {
		case esc:
			cur.WriteRune(r)
			esc = false
		case r == '\\' && quote != '\'':
			esc, inWord = true, true
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t' || r == '\n':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unclosed quote")
	}
	if esc {
		return nil, fmt.Errorf("trailing backslash")
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out, nil
}

// serveMetrics serves Prometheus metrics on addr ("" serves nothing) and
// returns the function that stops it.
func serveMetrics(addr string, m *monitor.Metrics) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	srv := &http.Server{Handler: m, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	return func() { srv.Close() }, nil
}

// gpuHealth watches the node's GPUs for Xid errors through the NVML that
// reg initialised (a node without it has no GPUs to watch: nil). reg's
// Close shuts NVML down; the returned function stops the watch.
func gpuHealth(ctx context.Context, reg *offload.Registry, log *slog.Logger) (monitor.HealthSource, func()) {
	lib, err := drivers.NVML(reg)
	if err != nil {
		return nil, func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	return monitor.WatchGPUs(ctx, lib, log), cancel
}
