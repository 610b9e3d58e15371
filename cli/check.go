package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	ucli "github.com/urfave/cli/v2"
)

type checkOpts struct{ common }

func checkCommand(e *env) *ucli.Command {
	o := &checkOpts{}
	return &ucli.Command{
		Name:  "check",
		Usage: "say which CRIU cryo would use, and whether it is usable here",
		Flags: o.common.flags(),
		Action: func(c *ucli.Context) error {
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			bin, err = criu.Vet(c.Context, bin, "") // always run `criu check` afresh here
			out := struct {
				Path     string         `json:"path"`
				Source   string         `json:"found_via"`
				Version  string         `json:"version,omitempty"`
				OK       bool           `json:"ok"`
				Problem  string         `json:"problem,omitempty"`
				Features *criu.Features `json:"features,omitempty"`
			}{Path: bin.Path, Source: bin.Source, OK: err == nil}
			if err == nil {
				f := criu.Probe(c.Context, bin)
				out.Features = &f
			}
			if bin.Version > 0 {
				out.Version = bin.VersionString()
			}
			if err != nil {
				out.Problem = err.Error()
			}
			if perr := o.emit(e, out, func(w io.Writer) {
				fmt.Fprintf(w, "criu: %s (found via %s)\n", out.Path, out.Source)
				if out.Version != "" {
					fmt.Fprintf(w, "version: %s\n", out.Version)
				}
				if out.OK {
					fmt.Fprintln(w, "criu check: looks good")
				}
				if f := out.Features; f != nil {
					if f.DirtyTracking {
						fmt.Fprintln(w, "memory change tracking (soft-dirty): available")
					} else {
						fmt.Fprintln(w, "memory change tracking (soft-dirty): not in this kernel; incremental checkpoints rely on content dedup")
					}
					fmt.Fprintf(w, "lazy restore (userfaultfd): %s\n", map[bool]string{true: "available", false: "not available"}[f.LazyPages])
				}
			}); perr != nil {
				return perr
			}
			return err
		},
	}
}

func contextWithTimeout(c *ucli.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, d)
}
