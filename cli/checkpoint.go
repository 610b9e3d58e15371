package cli

import (
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/offload"
	ucli "github.com/urfave/cli/v2"
)

type checkpointOpts struct {
	common
	store        string
	leaveRunning bool
	kill         bool
	workDir      string
	keep         int
	lockWait     time.Duration
	offloadWait  time.Duration
	replica      string
	replicaReq   bool
	packSize     string
	limits       criuLimits
}

func checkpointCommand(e *env) *ucli.Command {
	o := &checkpointOpts{}
	return &ucli.Command{
		Name:      "checkpoint",
		Usage:     "checkpoint the process tree rooted at PID into a new generation of the store",
		ArgsUsage: "PID [PID...]",
		Flags: append(append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory (created if missing)", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.BoolFlag{Name: "leave-running", Usage: "let the job go on after the checkpoint (default)", Destination: &o.leaveRunning},
			&ucli.BoolFlag{Name: "kill", Usage: "stop the job once its checkpoint is committed", Destination: &o.kill},
			&ucli.StringFlag{Name: "work-dir", Usage: "where images wait before they are stored (default: /dev/shm when it has room)", Destination: &o.workDir, EnvVars: []string{"CRYO_WORK_DIR"}},
			&ucli.IntFlag{Name: "keep", Usage: "keep at most N generations (0: all)", Destination: &o.keep, EnvVars: []string{"CRYO_KEEP"}},
			&ucli.DurationFlag{Name: "lock-wait", Usage: "how long to wait for another cryo writing the store", Value: 30 * time.Second, Destination: &o.lockWait},
			&ucli.DurationFlag{Name: "offload-timeout", Usage: "how long GPU work in flight may take to drain when the job's CUDA contexts are locked", Value: offload.DefaultLockTimeout, Destination: &o.offloadWait, EnvVars: []string{"CRYO_OFFLOAD_TIMEOUT"}},
			&ucli.StringFlag{Name: "replica", Usage: "also copy the checkpoint to this store directory (another disk, a partner node's mount); if that fails the checkpoint is kept in --store only, with a warning", Destination: &o.replica, EnvVars: []string{"CRYO_REPLICA"}},
			&ucli.BoolFlag{Name: "replica-required", Usage: "fail the checkpoint (the job goes on) when the --replica copy cannot be made", Destination: &o.replicaReq, EnvVars: []string{"CRYO_REPLICA_REQUIRED"}},
			packSizeFlag(&o.packSize),
		), o.limits.flags(true)...),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() < 1 {
				return usagef("checkpoint needs the PID of the job's root (or of each of its trees)")
			}
			var pids []int
			for _, a := range c.Args().Slice() {
				pid, err := strconv.Atoi(a)
				if err != nil || pid <= 0 {
					return usagef("PID must be a positive number, got %q", a)
				}
				pids = append(pids, pid)
			}
			pid := pids[0]
			if o.leaveRunning && o.kill {
				return usagef("--leave-running and --kill contradict each other")
			}
			if o.keep < 0 {
				return usagef("--keep must be >= 0, got %d", o.keep)
			}
			if o.replicaReq && o.replica == "" {
				return usagef("--replica-required needs --replica DIR")
			}
			packSize, err := parsePackSize(o.packSize)
			if err != nil {
				return err
			}
			ghostLimit, criuConfig, err := o.limits.parse()
			if err != nil {
				return err
			}
			reg := o.offload(e)
			defer reg.Close()
			prog, done := o.progress(e, "checkpoint: stored")
			res, err := cryo.Checkpoint(c.Context, cryo.CheckpointOptions{
				Store: o.store, PID: pid, MorePIDs: pids[1:], Kill: o.kill, CRIU: o.criu, WorkDir: o.workDir,
				Keep: o.keep, LockWait: o.lockWait, OffloadTimeout: o.offloadWait,
				Replica: o.replica, ReplicaRequired: o.replicaReq, PackSize: packSize, GhostLimit: ghostLimit, CRIUConfig: criuConfig,
				Offload: reg, Progress: prog, Logger: o.logger(e),
			})
			done()
			if err != nil {
				return err
			}
			warnReplica(e, res, o.replica)
			return o.emit(e, res, func(w io.Writer) {
				fmt.Fprintf(w, "generation %d of %s: %d processes, %s of images, %s new in the store; frozen %s, durable after %s\n",
					res.Generation, res.Store, res.Processes, human(res.RawBytes), human(res.NewBytes),
					res.Frozen.Round(time.Millisecond), res.Durable.Round(time.Millisecond))
				if res.Killed {
					fmt.Fprintf(w, "job stopped (pid %d)\n", pid)
				}
				if len(res.Removed) > 0 {
					fmt.Fprintf(w, "removed old generations %v\n", res.Removed)
				}
			})
		}),
	}
}

// human formats a byte count in MiB, the one unit of sizes in cryo's
// output (checkpoint, restore, list, verify, gc, inspect, gpus and the
// progress line), with one decimal; a count above zero too small to show
// is "<0.1 MiB".
func human(n int64) string {
	if n > 0 && n < (1<<20)/20 {
		return "<0.1 MiB"
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// warnReplica says on stderr, in --json mode too, that a generation has no
// replica copy and how to make one.
func warnReplica(e *env, res *cryo.CheckpointResult, replica string) {
	if res.ReplicaError == "" {
		return
	}
	fmt.Fprintf(e.stderr, "cryo: warning: generation %d is committed in %s but NOT in the replica: %s\n"+
		"cryo: copy it once the replica is usable again: cryo repair --store %s --replica %s --generation %d\n",
		res.Generation, res.Store, res.ReplicaError, replica, res.Store, res.Generation)
}
