package cli

import (
	"fmt"
	"io"
	"time"

	cryo "github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type migrateOpts struct {
	common
	store, socket, to, key string
	rounds                 int
	noPrecopy              bool
}

func migrateCommand(e *env) *ucli.Command {
	o := &migrateOpts{}
	return &ucli.Command{
		Name:  "migrate",
		Usage: "move a job that cryo run supervises to another node while it runs (where cryo run --receive waits)",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "the store of the job (its control socket is STORE/run/control.sock)", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}},
			&ucli.StringFlag{Name: "socket", Usage: "the control socket, when cryo run was given --control", Destination: &o.socket},
			&ucli.StringFlag{Name: "to", Usage: "the destination, host:port, where cryo run --receive listens", Destination: &o.to},
			&ucli.StringFlag{Name: "key", Usage: "the pre-shared key file the destination holds too (cryo keygen makes one)", Destination: &o.key, EnvVars: []string{"CRYO_MIGRATE_KEY"}},
			&ucli.IntFlag{Name: "rounds", Usage: "at most this many pre-copy rounds while the job runs", Value: 8, Destination: &o.rounds},
			&ucli.BoolFlag{Name: "no-precopy", Usage: "stop the job at once and copy all of it (stop and copy)", Destination: &o.noPrecopy},
		),
		Action: func(c *ucli.Context) error {
			switch {
			case c.NArg() > 0:
				return usagef("migrate takes no arguments (got %q)", c.Args().First())
			case o.store == "" && o.socket == "":
				return usagef("migrate needs --store (or --socket)")
			case o.to == "":
				return usagef("migrate needs --to HOST:PORT")
			case o.key == "":
				return usagef("migrate needs --key FILE")
			case o.rounds < 1:
				return usagef("--rounds must be at least 1 (--no-precopy for none)")
			}
			res, err := cryo.Migrate(c.Context, cryo.MigrateOptions{Store: o.store, Socket: o.socket, To: o.to, Key: o.key,
				MaxRounds: o.rounds, NoPrecopy: o.noPrecopy})
			if err != nil {
				return err
			}
			return o.emit(e, res, func(w io.Writer) {
				fmt.Fprintf(w, "migrated to %s: generation %d there\n", res.To, res.Generation)
				for _, r := range res.Rounds {
					fmt.Fprintf(w, "  round %d: %s read, %s changed, in %s\n", r.N, human(r.Pages*4096), human(r.Changed*4096), r.Took.Round(time.Millisecond))
				}
				fmt.Fprintf(w, "  stopped: %s sent (%d pages; %d already there)\n", human(res.FinalSent), res.FinalPages, res.FinalKnown)
				fmt.Fprintf(w, "  downtime %s (dump %s, restore there %s); %s sent for %s of memory\n",
					res.Downtime.Round(time.Millisecond), res.Frozen.Round(time.Millisecond), res.Restore.Round(time.Millisecond), human(res.Sent), human(res.JobBytes))
			})
		},
	}
}

func keygenCommand(e *env) *ucli.Command {
	return &ucli.Command{
		Name:      "keygen",
		Usage:     "write a fresh key for cryo migrate and cryo run --receive (mode 0600; copy it to the other node)",
		ArgsUsage: "FILE",
		Action: func(c *ucli.Context) error {
			if c.NArg() != 1 {
				return usagef("keygen needs FILE")
			}
			if err := cryo.NewKey(c.Args().First()); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "key written to %s\n", c.Args().First())
			return nil
		},
	}
}
