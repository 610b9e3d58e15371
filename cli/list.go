package cli

import (
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type listOpts struct {
	common
	store string
}

func listCommand(e *env) *ucli.Command {
	o := &listOpts{}
	return &ucli.Command{
		Name:  "list",
		Usage: "list the generations of a store with time, size, process count and whether each is intact",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("list takes no arguments, got %q", c.Args().Slice())
			}
			gens, err := cryo.List(c.Context, o.store)
			if err != nil {
				return err
			}
			return o.emit(e, gens, func(w io.Writer) {
				if len(gens) == 0 {
					fmt.Fprintf(w, "no checkpoints in %s\n", filepath.Clean(o.store))
					return
				}
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "GEN\tCREATED\tPROCS\tIMAGES\tSTORED\tSTATE")
				for _, g := range gens {
					state := "intact"
					if !g.Intact {
						state = "BROKEN: " + g.Problem
					}
					created := "-"
					if !g.Created.IsZero() {
						created = g.Created.Local().Format("2006-01-02 15:04:05")
					}
					fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\n", g.Number, created, g.Processes, human(g.RawBytes), human(g.StoredBytes), state)
				}
				tw.Flush()
			})
		}),
	}
}
