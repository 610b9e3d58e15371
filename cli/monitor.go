package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/cryo-hpc/cryo/monitor"
	ucli "github.com/urfave/cli/v2"
)

// DefaultSocket is the node daemon's control socket.
const DefaultSocket = "/run/cryo/monitor.sock"

type monitorOpts struct {
	common
	socket      string
	metricsAddr string
}

func monitorCommand(e *env) *ucli.Command {
	o := &monitorOpts{}
	return &ucli.Command{
		Name:  "monitor",
		Usage: "node daemon: supervise the jobs users submit (cryo run --monitor), each as its user",
		Description: `Runs as root. Jobs are submitted over the control socket; only root and a
job's owner may act on a job (checked with SO_PEERCRED). SIGTERM checkpoints
and stops every job, then exits.`,
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "socket", Usage: "control socket", Value: DefaultSocket, Destination: &o.socket, EnvVars: []string{"CRYO_MONITOR_SOCKET"}},
			&ucli.StringFlag{Name: "metrics-addr", Usage: "serve Prometheus metrics on this address", Destination: &o.metricsAddr},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("monitor takes no arguments")
			}
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(o.socket), 0o755); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.WithoutCancel(c.Context), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			d := &monitor.Daemon{CRIU: bin, CheckCache: checkCache, Logger: o.logger(e), Metrics: &monitor.Metrics{},
				OnEvent: func(ev monitor.Event) { fmt.Fprintf(e.stderr, "cryo: %s: %s: %s\n", ev.Job, ev.Kind, ev.Detail) }}
			health, closeHealth := gpuHealth(ctx, d.Logger)
			defer closeHealth()
			d.Health = health
			stopMetrics, err := serveMetrics(o.metricsAddr, d.Metrics)
			if err != nil {
				return err
			}
			defer stopMetrics()
			fmt.Fprintf(e.stderr, "cryo: monitor listening on %s\n", o.socket)
			return d.Serve(ctx, o.socket)
		},
	}
}

type ctlOpts struct {
	common
	socket string
	store  string
}

func ctlCommand(e *env) *ucli.Command {
	o := &ctlOpts{}
	return &ucli.Command{
		Name:      "ctl",
		Usage:     "talk to a running cryo run or cryo monitor: status, list, checkpoint, stop, swap-out, swap-in",
		ArgsUsage: "OP [JOB]",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "socket", Usage: "control socket (default: STORE/run/control.sock with --store, else " + DefaultSocket + ")", Destination: &o.socket, EnvVars: []string{"CRYO_MONITOR_SOCKET"}},
			&ucli.StringFlag{Name: "store", Usage: "the store of a job run by cryo run", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() < 1 || c.NArg() > 2 {
				return usagef("ctl needs OP [JOB]")
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
	case o.store != "":
		return filepath.Join(monitor.RunDir(o.store), "control.sock")
	}
	return DefaultSocket
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
