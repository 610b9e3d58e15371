package cli

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/monitor"
	"github.com/cryo-hpc/cryo/restore"
	ucli "github.com/urfave/cli/v2"
)

type swapOpts struct {
	common
	store string
}

// swapCommand is swap-out (checkpoint and terminate, freeing the job's
// devices) or swap-in (bring it back). A job supervised by cryo run is
// swapped through its control socket, and stays supervised;
// otherwise JOB is the PID of the tree to swap out.
func swapCommand(e *env, op string) *ucli.Command {
	o := &swapOpts{}
	usage := "checkpoint a job and terminate it, freeing its devices (process swapping for oversubscribed coprocessors)"
	if op == "swap-in" {
		usage = "bring a swapped-out job back"
	}
	return &ucli.Command{
		Name:      op,
		Usage:     usage,
		ArgsUsage: "[JOB]",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "the job's store", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() > 1 {
				return usagef("%s takes at most one JOB", op)
			}
			job := c.Args().First()
			sock := filepath.Join(monitor.RunDir(o.store), "control.sock")
			ctx, cancel := context.WithTimeout(c.Context, 30*time.Minute)
			defer cancel()
			if resp, err := monitor.Call(ctx, sock, monitor.Request{Op: op, Job: job}); err == nil {
				return printJobs(e, &o.common, op, resp)
			} else if resp != nil {
				return err // the supervisor answered: its refusal stands
			}
			// No supervisor: act on the store directly.
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			if op == "swap-out" {
				pid, err := strconv.Atoi(job)
				if err != nil || pid <= 0 {
					return usagef("no cryo supervises %s: give the PID of the job to swap out", o.store)
				}
				res, err := checkpoint.Take(ctx, checkpoint.Options{Store: o.store, PID: pid, Kill: true, CRIU: bin,
					CheckCache: checkCache, Logger: o.logger(e)})
				if err != nil {
					return fmt.Errorf("swap-out of pid %d failed (the job keeps running): %w", pid, err)
				}
				return o.emit(e, res, func(w io.Writer) {
					fmt.Fprintf(w, "swapped out pid %d as generation %d\n", pid, res.Generation)
				})
			}
			res, err := restore.Restore(ctx, restore.Options{Store: o.store, CRIU: bin, CheckCache: checkCache, Logger: o.logger(e)})
			if err != nil {
				return fmt.Errorf("swap-in failed: %w", err)
			}
			return o.emit(e, res, func(w io.Writer) { fmt.Fprintln(w, res.PID) })
		},
	}
}
