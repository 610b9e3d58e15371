package cli

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/cryo-hpc/cryo/monitor"
	ucli "github.com/urfave/cli/v2"
)

type ctlOpts struct {
	common
	socket string
	store  string
}

func ctlCommand(e *env) *ucli.Command {
	o := &ctlOpts{}
	return &ucli.Command{
		Name:      "ctl",
		Usage:     "talk to a running cryo run: status, checkpoint, stop, swap-out, swap-in",
		ArgsUsage: "OP [JOB]",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "the store of the job (its control socket is STORE/run/control.sock)", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}},
			&ucli.StringFlag{Name: "socket", Usage: "the control socket, when cryo run was given --control", Destination: &o.socket},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() < 1 || c.NArg() > 2 {
				return usagef("ctl needs OP [JOB]")
			}
			if o.socket == "" && o.store == "" {
				return usagef("ctl needs --store (or --socket)")
			}
			op := c.Args().Get(0)
			switch op {
			case "status", "list", "checkpoint", "stop", "swap-out", "swap-in":
			default:
				return usagef("unknown op %q (status, list, checkpoint, stop, swap-out, swap-in)", op)
			}
			resp, err := monitor.Call(c.Context, o.socketPath(), monitor.Request{Op: op, Job: c.Args().Get(1)})
			if err != nil {
				return err
			}
			return printJobs(e, &o.common, op, resp)
		},
	}
}

func (o *ctlOpts) socketPath() string {
	switch {
	case o.socket != "":
		return o.socket
	}
	return filepath.Join(monitor.RunDir(o.store), "control.sock")
}

func printJobs(e *env, c *common, op string, resp *monitor.Response) error {
	return c.emit(e, resp, func(w io.Writer) {
		if resp.Generation > 0 {
			fmt.Fprintf(w, "%s: generation %d\n", op, resp.Generation)
		}
		for _, j := range resp.Jobs {
			fmt.Fprintf(w, "%s\t%s\tpid %d\tgeneration %d\tcheckpoints %d\trestarts %d", j.Name, j.State, j.PID, j.Generation, j.Checkpoints, j.Restarts)
			if j.ExitCode != nil {
				fmt.Fprintf(w, "\texit %d", *j.ExitCode)
			}
			if j.LastFailure != "" {
				fmt.Fprintf(w, "\tlast failure: %s", j.LastFailure)
			}
			fmt.Fprintln(w)
		}
	})
}
