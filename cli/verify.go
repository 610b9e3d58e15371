package cli

import (
	"fmt"
	"io"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type verifyOpts struct {
	common
	store      string
	generation int
}

func verifyCommand(e *env) *ucli.Command {
	o := &verifyOpts{}
	return &ucli.Command{
		Name:  "verify",
		Usage: "re-hash every chunk of every generation (or --generation N) and name each bad one",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "generation", Usage: "generation to verify (default: all)", Destination: &o.generation},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("verify takes no arguments, got %q", c.Args().Slice())
			}
			if o.generation < 0 {
				return usagef("--generation must be >= 1, got %d", o.generation)
			}
			prog, done := o.progress(e, "verify")
			results, err := cryo.Verify(c.Context, cryo.VerifyOptions{Store: o.store, Generation: o.generation, Progress: prog})
			done()
			if err != nil {
				return err
			}
			if err := o.emit(e, results, func(w io.Writer) {
				for _, r := range results {
					switch {
					case r.Intact:
						fmt.Fprintf(w, "generation %d: intact\n", r.Generation)
					case r.Error != "":
						fmt.Fprintf(w, "generation %d: BAD: %s\n", r.Generation, r.Error)
					default:
						fmt.Fprintf(w, "generation %d: BAD: %d problems\n", r.Generation, len(r.Problems))
						for _, p := range r.Problems {
							fmt.Fprintf(w, "  %s\n", p)
						}
					}
				}
			}); err != nil {
				return err
			}
			bad := 0
			for _, r := range results {
				if !r.Intact {
					bad++
				}
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d generations are damaged", bad, len(results))
			}
			return nil
		}),
	}
}
