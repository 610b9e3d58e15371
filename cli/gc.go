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
	repack   bool
	packSize string
	lockWait time.Duration
}

func gcCommand(e *env) *ucli.Command {
	o := &gcOpts{}
	return &ucli.Command{
		Name:  "gc",
		Usage: "remove chunks no committed generation references and repack mostly unused packs (and, with --keep N, old generations)",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "keep", Usage: "first remove all but the newest N generations", Destination: &o.keep},
			&ucli.BoolFlag{Name: "repack", Usage: "rewrite every pack holding unused bytes, merge small packs, and pack the chunk files of a store written by an older cryo (converts it)", Destination: &o.repack},
			packSizeFlag(&o.packSize),
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
			packSize, err := parsePackSize(o.packSize)
			if err != nil {
				return err
			}
			res, err := cryo.GC(c.Context, cryo.GCOptions{Store: o.store, Keep: o.keep, Repack: o.repack, PackSize: packSize, LockWait: o.lockWait})
			if err != nil {
				return err
			}
			return o.emit(e, res, func(w io.Writer) {
				if len(res.RemovedGenerations) > 0 {
					fmt.Fprintf(w, "removed generations %v\n", res.RemovedGenerations)
				}
				fmt.Fprintf(w, "removed %d unreferenced chunks (%s); %d chunks in use\n", res.Chunks, human(res.Bytes), res.Kept)
				if res.Repacked > 0 || res.PacksWritten > 0 || res.ChunkFiles > 0 {
					fmt.Fprintf(w, "repacked %d packs and %d chunk files into %d new packs; removed %d packs\n", res.Repacked, res.ChunkFiles, res.PacksWritten, res.PacksRemoved)
				}
				if res.Damaged > 0 {
					fmt.Fprintf(w, "%d chunks in use are damaged and were left where they are (cryo verify, cryo repair)\n", res.Damaged)
				}
			})
		}),
	}
}
