package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/cryo-hpc/cryo/restore"
	ucli "github.com/urfave/cli/v2"
)

type restoreOpts struct {
	common
	store      string
	generation int
	workDir    string
	pidWait    time.Duration
}

func restoreCommand(e *env) *ucli.Command {
	o := &restoreOpts{}
	return &ucli.Command{
		Name:  "restore",
		Usage: "restore the newest good generation (or --generation N), detached, and print the restored root PID",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "generation", Usage: "generation to restore (default: newest)", Destination: &o.generation},
			&ucli.StringFlag{Name: "work-dir", Usage: "where images are materialized (default: /dev/shm when it has room)", Destination: &o.workDir, EnvVars: []string{"CRYO_WORK_DIR"}},
			&ucli.DurationFlag{Name: "pid-wait", Usage: "how long to wait for a dying process to free a PID the job needs", Value: 10 * time.Second, Destination: &o.pidWait},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("restore takes no arguments, got %q", c.Args().Slice())
			}
			if o.generation < 0 {
				return usagef("--generation must be >= 1, got %d", o.generation)
			}
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			res, err := restore.Restore(c.Context, restore.Options{
				Store: o.store, Generation: o.generation, CRIU: bin, WorkDir: o.workDir,
				PIDWait: o.pidWait, CheckCache: checkCache, Logger: o.logger(e),
			})
			if err != nil {
				return fmt.Errorf("restore failed: %w", err)
			}
			return o.emit(e, res, func(w io.Writer) { fmt.Fprintln(w, res.PID) })
		},
	}
}
