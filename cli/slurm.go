package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/monitor"
	ucli "github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

// ---- cryo slurm prolog | epilog ----

type slurmHookOpts struct {
	common
	storeRoot     string
	keepOnSuccess bool
	leaveOrphans  bool
	strict        bool
	log           string
	timeout       time.Duration
}

func slurmCommand(e *env) *ucli.Command {
	usage := func(_ *ucli.Context, err error, _ bool) error { return usageError{err.Error()} }
	return &ucli.Command{
		Name:  "slurm",
		Usage: "Slurm integration: the Prolog and Epilog hooks (see contrib/slurm/ and docs/slurm.md)",
		Description: `Inside a batch job, cryo run needs no --store: it uses STORE_ROOT/cryo-$SLURM_JOB_ID,
which survives requeues, and with --requeue it checkpoints, stops and requeues the
job on the checkpoint signal (USR1; sbatch --signal=B:USR1@300), then resumes it when
the job runs again. These hooks, run as root from slurm.conf's Prolog and Epilog,
prepare and tidy that store.`,
		Subcommands: []*ucli.Command{
			slurmHookCommand(e, "prolog", "prepare the job's store (owned by the job's user, 0700), end leftovers of earlier runs, record node and GPUs"),
			slurmHookCommand(e, "epilog", "end the job's leftover processes, remove staging leftovers, keep checkpoints for a requeue, delete the store of a job that completed"),
		},
		OnUsageError: usage,
	}
}

func slurmHookCommand(e *env, hook, usage string) *ucli.Command {
	o := &slurmHookOpts{}
	return &ucli.Command{
		Name:  hook,
		Usage: usage,
		Description: `Runs as root from Slurm's ` + hook + ` (with no PATH), reading SLURM_JOB_ID, SLURM_JOB_USER,
SLURM_JOB_UID/GID, SLURM_JOB_RESTART_COUNT, SLURM_JOB_WORK_DIR and, in the epilog,
SLURM_JOB_EXIT_CODE(2). It logs to syslog (or --log FILE) and exits 0 even when it
could not do its work, unless --strict: a failing prolog drains the node.`,
		Flags: []ucli.Flag{
			&ucli.StringFlag{Name: "store-root", Usage: "where per-job stores live: ROOT/cryo-$SLURM_JOB_ID (default: the job's working directory, which must belong to the job's user)", Destination: &o.storeRoot, EnvVars: []string{"CRYO_STORE_ROOT"}},
			&ucli.BoolFlag{Name: "keep-on-success", Usage: "epilog: keep the store of a job that completed successfully (default: delete it)", Destination: &o.keepOnSuccess, EnvVars: []string{"CRYO_SLURM_KEEP_ON_SUCCESS"}},
			&ucli.BoolFlag{Name: "leave-orphans", Usage: "do not end processes left over from earlier runs of the job", Destination: &o.leaveOrphans},
			&ucli.BoolFlag{Name: "strict", Usage: "exit 1 when the hook could not do its work (a failing prolog drains the node)", Destination: &o.strict, EnvVars: []string{"CRYO_SLURM_STRICT"}},
			&ucli.StringFlag{Name: "log", Usage: "where to log: syslog, stderr, or a file to append to", Value: "syslog", Destination: &o.log, EnvVars: []string{"CRYO_SLURM_LOG"}},
			&ucli.DurationFlag{Name: "timeout", Usage: "give up after this long", Value: time.Minute, Destination: &o.timeout},
			&ucli.BoolFlag{Name: "json", Usage: "print what the hook did as JSON", Destination: &o.json},
		},
		OnUsageError: func(_ *ucli.Context, err error, _ bool) error { return usageError{err.Error()} },
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("slurm %s takes no arguments, got %q", hook, c.Args().Slice())
			}
			log, closeLog := hookLogger(e, o.log)
			defer closeLog()
			log = log.With("hook", hook, "job", e.getenv("SLURM_JOB_ID"))
			ctx, cancel := context.WithTimeout(c.Context, o.timeout)
			defer cancel()
			fail := func(err error) error {
				log.Error(hook+": could not do its work", "err", err, "strict", o.strict)
				if o.strict {
					return exitError{code: ExitFailed, err: fmt.Errorf("slurm %s: %w", hook, err)}
				}
				return nil
			}
			job, err := cryo.SlurmJobFromEnv(e.getenv)
			if err != nil {
				return fail(err)
			}
			hopts := cryo.HookOptions{Root: o.storeRoot, KeepOnSuccess: o.keepOnSuccess, LeaveOrphans: o.leaveOrphans, Logger: log}
			run := cryo.SlurmProlog
			if hook == "epilog" {
				run = cryo.SlurmEpilog
			}
			rep, herr := run(ctx, job, hopts)
			if sum := summarize(rep); herr == nil || !strings.HasSuffix(sum, "nothing to do") {
				log.Info(sum, "restart", job.RestartCount, "user", job.User, "node", job.Node)
			}
			if o.json {
				fmt.Fprintln(e.stdout, mustJSON(rep))
			}
			if herr != nil {
				return fail(herr)
			}
			return nil
		},
	}
}

// summarize says in one line what a hook did.
func summarize(r *cryo.HookReport) string {
	var parts []string
	switch {
	case r.Store == "":
	case r.Created:
		parts = append(parts, "created store "+r.Store)
	case r.Removed:
		parts = append(parts, "removed store "+r.Store+" ("+r.Why+")")
	case r.Hook == "epilog":
		parts = append(parts, "kept store "+r.Store+" ("+r.Why+")")
	default:
		parts = append(parts, "store "+r.Store+" is ready")
	}
	if r.Store == "" && r.Why != "" {
		parts = append(parts, r.Why)
	}
	if r.Staging > 0 {
		parts = append(parts, fmt.Sprintf("removed %d staging leftovers", r.Staging))
	}
	if len(r.Orphans) > 0 {
		var ps []string
		for _, o := range r.Orphans {
			ps = append(ps, fmt.Sprintf("%d (%s)", o.PID, o.Comm))
		}
		parts = append(parts, "ended leftover processes "+strings.Join(ps, ", "))
	}
	if len(r.GPUs) > 0 {
		parts = append(parts, fmt.Sprintf("node has %d GPUs", len(r.GPUs)))
	}
	if len(parts) == 0 {
		return r.Hook + ": nothing to do"
	}
	return r.Hook + ": " + strings.Join(parts, "; ")
}

// hookLogger logs to syslog (falling back to stderr where there is none),
// stderr, or appends to a file.
func hookLogger(e *env, where string) (*slog.Logger, func()) {
	opts := &slog.HandlerOptions{Level: slog.LevelInfo}
	switch where {
	case "", "stderr", "-":
		return slog.New(slog.NewTextHandler(e.stderr, opts)), func() {}
	case "syslog":
		w, err := syslog.New(syslog.LOG_INFO|syslog.LOG_DAEMON, "cryo-slurm")
		if err != nil {
			l := slog.New(slog.NewTextHandler(e.stderr, opts))
			l.Warn("no syslog; logging to stderr", "err", err)
			return l, func() {}
		}
		return slog.New(slog.NewTextHandler(w, opts)), func() { w.Close() }
	}
	f, err := os.OpenFile(where, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		l := slog.New(slog.NewTextHandler(e.stderr, opts))
		l.Warn("cannot open the log file; logging to stderr", "file", where, "err", err)
		return l, func() {}
	}
	return slog.New(slog.NewTextHandler(f, opts)), func() { f.Close() }
}

// ---- what cryo run does under Slurm, and with its signals ----

// runSignals is how `cryo run` reads its signals: SIGUSR1 and the
// --checkpoint-signal checkpoint; with --requeue the checkpoint signal
// checkpoints, stops and requeues the Slurm job; SIGTERM and SIGINT
// checkpoint and stop.
type runSignals struct {
	ckpt     syscall.Signal
	requeue  bool
	job      *cryo.SlurmJob // nil outside Slurm
	scontrol string
	stderr   io.Writer
	// asked is set while a stop for a requeue is under way or done.
	asked atomic.Bool
}

// slurmSetup resolves what `cryo run` needs from Slurm: the per-job store
// when --store is not given, the checkpoint signal, and --requeue.
func (o *runOpts) slurmSetup(e *env) (*runSignals, error) {
	sig, err := parseSignal(o.ckptSignal)
	if err != nil {
		return nil, usagef("--checkpoint-signal: %v", err)
	}
	r := &runSignals{ckpt: sig, requeue: o.requeue, scontrol: e.getenv("CRYO_SCONTROL"), stderr: e.stderr}
	job, err := cryo.SlurmJobFromEnv(e.getenv)
	switch {
	case err == nil:
		r.job = &job
	case !errors.Is(err, cryo.ErrNotSlurm) || e.getenv("SLURM_JOB_ID") != "":
		return nil, err
	}
	if o.requeue && r.job == nil {
		return nil, usagef("--requeue needs a Slurm batch job (SLURM_JOB_ID is not set)")
	}
	if o.store == "" {
		if r.job == nil {
			return nil, usagef("run needs --store (or $CRYO_STORE), unless it runs in a Slurm job")
		}
		if o.store, err = r.job.Store(o.storeRoot); err != nil {
			return nil, usagef("%v", err)
		}
		fmt.Fprintf(e.stderr, "cryo: slurm job %s, run %d: store %s\n", job.ID, job.RestartCount+1, o.store)
	}
	if r.job != nil && batchShellDrops(os.Getppid(), sig) {
		fmt.Fprintf(e.stderr, "cryo: warning: cryo run is a child of the batch script, whose shell neither traps nor ignores %s: "+
			"a `--signal=B:%s` would kill the shell instead of reaching cryo. Start it with `exec cryo run ...`, "+
			"or in the background with a trap that forwards the signal, then `wait`.\n", unix.SignalName(sig), strings.TrimPrefix(unix.SignalName(sig), "SIG"))
	}
	return r, nil
}

func (r *runSignals) notify() []os.Signal {
	return []os.Signal{syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT, r.ckpt}
}

// op turns a signal into a supervisor request.
func (r *runSignals) op(s os.Signal) string {
	switch {
	case s == r.ckpt && r.requeue:
		r.asked.Store(true)
		fmt.Fprintf(r.stderr, "cryo: %s: checkpoint, stop and requeue the job\n", unix.SignalName(r.ckpt))
		return "stop"
	case s == r.ckpt, s == syscall.SIGUSR1:
		return "checkpoint"
	}
	r.asked.Store(false) // SIGTERM or SIGINT: stop, and no requeue
	return "stop"
}

// failed reports that the request op for signal s failed. Requests still
// waiting when cryo exits fail with context.Canceled: nothing to report.
func (r *runSignals) failed(e *env, s os.Signal, op string, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	fmt.Fprintf(e.stderr, "cryo: %s on %s failed: %v\n", op, s, err)
	if s == r.ckpt && r.requeue {
		r.asked.Store(false)
		fmt.Fprintf(e.stderr, "cryo: the job keeps running and is not requeued\n")
	}
}

// afterRun requeues the Slurm job when the supervisor stopped it for the
// checkpoint signal, and turns the outcome into cryo's exit code: 143
// (checkpointed and stopped) also after a successful requeue, so that
// whatever follows cryo in a batch script does not take the stopped job
// for a finished one.
func (r *runSignals) afterRun(ctx context.Context, e *env, sup *monitor.Supervisor, code int, err error) (int, error) {
	if err != nil || !r.asked.Load() || r.job == nil {
		return code, err
	}
	st := sup.Status()
	if st.State != monitor.StateStopped {
		return code, err
	}
	t0 := time.Now()
	if rerr := r.job.Requeue(ctx, r.scontrol); rerr != nil {
		return ExitFailed, fmt.Errorf("%w; the job is stopped and checkpointed as generation %d in %s: "+
			"resubmit it with `cryo run --store %s -- ...` to resume it", rerr, st.Generation, st.Store, st.Store)
	}
	fmt.Fprintf(e.stderr, "cryo: requeued: Slurm job %s (scontrol requeue took %s); it resumes from generation %d when it runs again\n",
		r.job.ID, time.Since(t0).Round(time.Millisecond), st.Generation)
	return code, nil
}

// parseSignal reads a signal name (USR1, SIGUSR1, usr1) or number.
func parseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n >= 65 {
			return 0, fmt.Errorf("%d is not a signal number", n)
		}
		return checkSignal(syscall.Signal(n))
	}
	name := strings.ToUpper(strings.TrimSpace(s))
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal %q", s)
	}
	return checkSignal(sig)
}

func checkSignal(sig syscall.Signal) (syscall.Signal, error) {
	switch sig {
	case syscall.SIGKILL, syscall.SIGSTOP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD, syscall.SIGSEGV, syscall.SIGBUS, syscall.SIGFPE, syscall.SIGILL:
		return 0, fmt.Errorf("%s cannot be the checkpoint signal", unix.SignalName(sig))
	}
	return sig, nil
}

// batchShellDrops reports whether pid is a Slurm batch script (slurmd runs
// it as .../job<ID>/slurm_script) whose shell neither catches nor ignores
// sig. A `--signal=B:` signal goes to that shell only; without a trap it
// dies of it and the job ends, whatever cryo would have done.
func batchShellDrops(pid int, sig syscall.Signal) bool {
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	batch := false
	for _, a := range bytes.Split(cmdline, []byte{0}) {
		if bytes.HasSuffix(a, []byte("/slurm_script")) {
			batch = true
		}
	}
	if !batch {
		return false
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	var handled uint64
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && (k == "SigCgt" || k == "SigIgn") {
			m, _ := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			handled |= m
		}
	}
	return handled&(1<<(uint(sig)-1)) == 0
}

// startOverCheck is --start-over: when `cryo run` is about to resume (the
// store holds generations of an unfinished run) but no generation is
// intact, it says so and starts the job from the beginning instead of
// failing. It verifies newest first and stops at the first intact one;
// otherwise resuming, with its fallback to older generations, goes ahead.
func (o *runOpts) startOverCheck(ctx context.Context, e *env, cfg *monitor.Config) error {
	if !o.startOver || cfg.Fresh {
		return nil
	}
	state, err := cryo.RunState(cfg.Store)
	if err != nil || state == "" || state == string(monitor.StateCompleted) || state == string(monitor.StateFailed) {
		return nil // not a resume (or the monitor will say what is wrong)
	}
	gens, err := cryo.List(cfg.Store)
	if err != nil || len(gens) == 0 {
		return nil
	}
	var bad []string
	for i := len(gens) - 1; i >= 0; i-- {
		vs, err := cryo.Verify(ctx, cfg.Store, gens[i].Number)
		if err != nil {
			return fmt.Errorf("--start-over: verify %s: %w", cfg.Store, err)
		}
		if len(vs) == 1 && vs[0].Intact {
			return nil
		}
		p := "damaged"
		if len(vs) == 1 && len(vs[0].Problems) > 0 {
			p = vs[0].Problems[0]
			if n := len(vs[0].Problems) - 1; n > 0 {
				p += fmt.Sprintf(" (+%d more)", n)
			}
		}
		bad = append(bad, fmt.Sprintf("generation %d: %s", gens[i].Number, p))
	}
	fmt.Fprintf(e.stderr, "cryo: no checkpoint in %s is intact (%s): starting the job over from the beginning (--start-over)\n",
		cfg.Store, strings.Join(bad, "; "))
	cfg.Fresh = true
	return nil
}
