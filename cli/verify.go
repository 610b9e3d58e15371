package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/cryo-hpc/cryo/internal/store"
	ucli "github.com/urfave/cli/v2"
)

type verifyOpts struct {
	common
	store      string
	generation int
}

type verifyResult struct {
	Generation int             `json:"generation"`
	Intact     bool            `json:"intact"`
	Problems   []store.Problem `json:"problems,omitempty"`
	Error      string          `json:"error,omitempty"`
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
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("verify takes no arguments, got %q", c.Args().Slice())
			}
			st, err := store.Open(o.store)
			if err != nil {
				return err
			}
			// Wait for a checkpoint or GC writing the store, but not forever.
			unlock, err := st.LockWithin(c.Context, false, 0)
			if err != nil {
				return err
			}
			defer unlock()
			gens := []int{o.generation}
			if o.generation == 0 {
				if gens, err = st.Generations(); err != nil {
					return err
				}
			}
			var results []verifyResult
			bad := 0
			prog, done := o.progress(e, "verify")
			st.Progress = prog
			for _, g := range gens {
				r := verifyResult{Generation: g}
				m, err := st.ReadManifest(g)
				if err != nil {
					r.Error = err.Error()
				} else {
					r.Problems = st.Verify(c.Context, m)
				}
				r.Intact = r.Error == "" && len(r.Problems) == 0
				if !r.Intact {
					bad++
				}
				results = append(results, r)
			}
			done()
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
			if bad > 0 {
				return errors.New(fmt.Sprint(bad, " of ", len(results), " generations are damaged"))
			}
			return nil
		},
	}
}
