package cli

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type repairOpts struct {
	common
	store      string
	replica    string
	generation int
}

func repairCommand(e *env) *ucli.Command {
	o := &repairOpts{}
	return &ucli.Command{
		Name:  "repair",
		Usage: "heal damaged or missing chunks and manifests of a store from its replica, verifying every copy",
		Description: `Every generation of --store (or --generation N) is verified; each chunk that
is damaged or missing, and a damaged manifest, is taken from --replica,
checked against its hash and written back. A generation that --store lacks
is copied from the replica when named with --generation. Exit 1 when
something stays broken (damaged in both copies).`,
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory to repair", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.StringFlag{Name: "replica", Usage: "replica store to take good copies from", Destination: &o.replica, EnvVars: []string{"CRYO_REPLICA"}, Required: true},
			&ucli.IntFlag{Name: "generation", Usage: "generation to repair (default: all of the store's)", Destination: &o.generation},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("repair takes no arguments, got %q", c.Args().Slice())
			}
			if o.generation < 0 {
				return usagef("--generation must be >= 1, got %d", o.generation)
			}
			prog, done := o.progress(e, "repair: verified")
			results, err := cryo.Repair(c.Context, cryo.RepairOptions{Store: o.store, Replica: o.replica, Generation: o.generation, Progress: prog})
			done()
			if errors.Is(err, cryo.ErrSameStore) {
				return usagef("--replica is the store itself")
			}
			if err != nil {
				return err
			}
			if err := o.emit(e, results, func(w io.Writer) {
				if len(results) == 0 {
					fmt.Fprintf(w, "no checkpoints in %s\n", filepath.Clean(o.store))
				}
				for _, r := range results {
					printRepair(w, r)
				}
			}); err != nil {
				return err
			}
			broken := 0
			for _, r := range results {
				if !r.Intact {
					broken++
				}
			}
			if broken > 0 {
				return fmt.Errorf("%d of %d generations are still damaged: neither %s nor %s holds a good copy of what is listed",
					broken, len(results), filepath.Clean(o.store), filepath.Clean(o.replica))
			}
			return nil
		}),
	}
}

func printRepair(w io.Writer, r cryo.RepairResult) {
	var what []string
	if r.Manifest != "" {
		what = append(what, "manifest "+r.Manifest)
	}
	if n := len(r.Fixed); n > 0 {
		what = append(what, fmt.Sprintf("%d chunks restored from the replica", n))
	}
	state := "intact"
	switch {
	case !r.Intact:
		state = "STILL BROKEN"
	case len(what) > 0:
		state = "repaired"
	}
	fmt.Fprintf(w, "generation %d: %s", r.Generation, state)
	for i, s := range what {
		sep := ", "
		if i == 0 {
			sep = ": "
		}
		fmt.Fprint(w, sep+s)
	}
	fmt.Fprintln(w)
	for _, p := range r.Fixed {
		fmt.Fprintf(w, "  fixed   %s\n", p)
	}
	for _, p := range r.Broken {
		fmt.Fprintf(w, "  BROKEN  %s\n", p)
	}
}
