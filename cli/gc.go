package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type gcOpts struct {
	common
	store    string
	keep     int
	lockWait time.Duration
}

func gcCommand(e *env) *ucli.Command {
	o := &gcOpts{}
	return &ucli.Command{
		Name:  "gc",
		Usage: "remove chunks no committed generation references (and, with --keep N, old generations)",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "keep", Usage: "first remove all but the newest N generations", Destination: &o.keep},
			&ucli.DurationFlag{Name: "lock-wait", Usage: "how long to wait for a checkpoint writing the store", Value: 5 * time.Minute, Destination: &o.lockWait},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("gc takes no arguments, got %q", c.Args().Slice())
			}
			if o.keep < 0 {
				return usagef("--keep must be >= 0, got %d", o.keep)
			}
			if o.lockWait <= 0 {
				return usagef("--lock-wait must be above 0, got %s", o.lockWait)
			}
			res, err := cryo.GC(c.Context, cryo.GCOptions{Store: o.store, Keep: o.keep, LockWait: o.lockWait})
			if err != nil {
				return err
			}
			return o.emit(e, res, func(w io.Writer) {
				if len(res.RemovedGenerations) > 0 {
					fmt.Fprintf(w, "removed generations %v\n", res.RemovedGenerations)
				}
				fmt.Fprintf(w, "removed %d unreferenced chunks (%s); %d chunks in use\n", res.Chunks, human(res.Bytes), res.Kept)
			})
		}),
	}
}
