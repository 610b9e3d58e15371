package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/restore"
	ucli "github.com/urfave/cli/v2"
)

type restoreOpts struct {
	common
	store      string
	generation int
	workDir    string
	pidWait    time.Duration
	deviceMap  string
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
			&ucli.StringFlag{Name: "device-map", Usage: "restore GPU contexts onto these GPUs: OLD=NEW,... (GPU UUIDs or indexes; default: the recorded GPUs, or same-model ones with room)", Destination: &o.deviceMap, EnvVars: []string{"CRYO_DEVICE_MAP"}},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("restore takes no arguments, got %q", c.Args().Slice())
			}
			if o.generation < 0 {
				return usagef("--generation must be >= 1, got %d", o.generation)
			}
			dmap, err := offload.ParseDeviceMap(o.deviceMap)
			if err != nil {
				return usagef("--device-map: %v", err)
			}
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			res, err := restore.Restore(c.Context, restore.Options{
				Store: o.store, Generation: o.generation, CRIU: bin, WorkDir: o.workDir,
				PIDWait: o.pidWait, CheckCache: checkCache, DeviceMap: dmap, Logger: o.logger(e),
			})
			if err != nil {
				return fmt.Errorf("restore failed: %w", err)
			}
			return o.emit(e, res, func(w io.Writer) { fmt.Fprintln(w, res.PID) })
		},
	}
}
