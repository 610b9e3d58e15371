package cli

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type recoverOpts struct {
	common
	store string
}

func recoverCommand(e *env) *ucli.Command {
	o := &recoverOpts{}
	return &ucli.Command{
		Name:  "recover",
		Usage: "put back to running the jobs that a killed cryo left with GPU contexts locked or processes stopped",
		Description: "A checkpoint or restore journals every change it makes to a job's offload contexts in the\n" +
			"store's staging/journal. If cryo is killed half-way, `cryo recover` (or the next checkpoint or\n" +
			"restore on the store) reads the journal and brings each context back: restore, unlock, continue.",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("recover takes no arguments, got %q", c.Args().Slice())
			}
			reg := o.offload(e)
			defer reg.Close()
			rs, rerr := cryo.Recover(c.Context, cryo.RecoverOptions{Store: o.store, Offload: reg, Logger: o.logger(e)})
			if rs == nil {
				return rerr // the store could not be opened
			}
			if err := o.emit(e, rs, func(w io.Writer) { printRecovered(w, filepath.Clean(o.store), rs) }); err != nil {
				return err
			}
			if rerr != nil {
				return fmt.Errorf("recovery incomplete (the journal stays; run cryo recover again): %w", rerr)
			}
			return nil
		}),
	}
}

func printRecovered(w io.Writer, dir string, rs []cryo.Recovered) {
	if len(rs) == 0 {
		fmt.Fprintf(w, "nothing to recover in %s\n", dir)
		return
	}
	for _, r := range rs {
		head := fmt.Sprintf("interrupted %s", r.Op)
		if r.RootPID > 0 {
			head += fmt.Sprintf(" of job %d", r.RootPID)
		}
		switch {
		case r.Err != "":
			head += ": NOT recovered"
		case r.Done:
			head += ": recovered"
		}
		fmt.Fprintln(w, head)
		if len(r.Continued) > 0 {
			fmt.Fprintf(w, "  continued stopped processes %v\n", r.Continued)
		}
		for _, c := range r.Contexts {
			switch {
			case c.Gone:
				fmt.Fprintf(w, "  %s context of pid %d: process gone, nothing to do\n", c.Kind, c.PID)
			case c.Err != "":
				fmt.Fprintf(w, "  %s context of pid %d: %s\n", c.Kind, c.PID, c.Err)
			case c.From == c.To:
				fmt.Fprintf(w, "  %s context of pid %d: already %s\n", c.Kind, c.PID, c.To)
			default:
				fmt.Fprintf(w, "  %s context of pid %d: %s -> %s", c.Kind, c.PID, c.From, c.To)
				if c.Interrupted != "" {
					fmt.Fprintf(w, " (cryo was killed during its %s)", c.Interrupted)
				}
				fmt.Fprintln(w)
			}
		}
		if r.Err != "" {
			fmt.Fprintf(w, "  %s\n", strings.ReplaceAll(r.Err, "\n", "\n  "))
		}
	}
}
