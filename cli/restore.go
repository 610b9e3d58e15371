package cli

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/offload"
	ucli "github.com/urfave/cli/v2"
)

type restoreOpts struct {
	common
	store      string
	generation int
	workDir    string
	pidWait    time.Duration
	deviceMap  string
	replica    string
	fallback   bool
	lazy       bool
	noStream   bool
	limits     criuLimits
}

func restoreCommand(e *env) *ucli.Command {
	o := &restoreOpts{}
	return &ucli.Command{
		Name:  "restore",
		Usage: "restore the newest good generation (or --generation N), detached, and print the restored root PID",
		Flags: append(append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "generation", Usage: "generation to restore (default: newest)", Destination: &o.generation},
			&ucli.StringFlag{Name: "work-dir", Usage: "where images are materialized (default: /dev/shm when it has room)", Destination: &o.workDir, EnvVars: []string{"CRYO_WORK_DIR"}},
			&ucli.DurationFlag{Name: "pid-wait", Usage: "how long to wait for a dying process to free a PID the job needs", Value: 10 * time.Second, Destination: &o.pidWait},
			&ucli.StringFlag{Name: "device-map", Usage: "restore GPU contexts onto these GPUs: OLD=NEW,... (GPU UUIDs or indexes; default: the recorded GPUs, or same-model ones with room)", Destination: &o.deviceMap, EnvVars: []string{"CRYO_DEVICE_MAP"}},
			&ucli.StringFlag{Name: "replica", Usage: "heal damaged chunks (and a damaged manifest) of the generation from this replica store before anything starts", Destination: &o.replica, EnvVars: []string{"CRYO_REPLICA"}},
			&ucli.BoolFlag{Name: "lazy", Usage: "start the job before its memory is back: pages come on demand (userfaultfd) and in the background; cryo prints the PID at once and exits when every page is home", Destination: &o.lazy, EnvVars: []string{"CRYO_LAZY"}},
			&ucli.BoolFlag{Name: "fallback", Usage: "when the generation is damaged and cannot be healed, restore the newest older intact one instead", Destination: &o.fallback, EnvVars: []string{"CRYO_FALLBACK"}},
			&ucli.BoolFlag{Name: "no-stream", Usage: "write the images into --work-dir and let CRIU read them from there, instead of streaming them from the store into CRIU (lazy restores and jobs of several trees always do)", Destination: &o.noStream, EnvVars: []string{"CRYO_NO_STREAM"}},
		), o.limits.flags(false)...),
		Action: o.action(e, func(c *ucli.Context) error {
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
			_, criuConfig, err := o.limits.parse()
			if err != nil {
				return err
			}
			reg := o.offload(e)
			defer reg.Close()
			prog, done := o.progress(e, "restore: verified")
			res, err := cryo.Restore(c.Context, cryo.RestoreOptions{
				Store: o.store, Generation: o.generation, Fallback: o.fallback, CRIU: o.criu, WorkDir: o.workDir,
				PIDWait: o.pidWait, DeviceMap: dmap, Replica: o.replica, Lazy: o.lazy, NoStream: o.noStream, CRIUConfig: criuConfig,
				Offload: reg, Progress: prog, Logger: o.logger(e),
			})
			done()
			if err != nil {
				if errors.Is(err, cryo.ErrCorrupt) && !o.fallback {
					hint := "hint: cryo restore --fallback restores the newest older intact generation instead"
					if o.replica == "" {
						hint += "; with a replica, cryo restore --replica DIR or cryo repair --store " + o.store + " --replica DIR heals this one"
					}
					return fmt.Errorf("%w (%s)", err, hint)
				}
				return err
			}
			// What was healed or passed over goes to stderr: stdout is the PID.
			for _, p := range res.Healed {
				fmt.Fprintf(e.stderr, "cryo: healed from the replica: %s\n", p)
			}
			for _, s := range res.Skipped {
				fmt.Fprintf(e.stderr, "cryo: passed over damaged %s\n", s)
			}
			if len(res.Skipped) > 0 {
				fmt.Fprintf(e.stderr, "cryo: restored OLDER generation %d instead (--fallback)\n", res.Generation)
			}
			for _, t := range res.TmpfsFiles {
				fmt.Fprintf(e.stderr, "cryo: tmpfs file brought back to the checkpoint: %s\n", t)
			}
			for _, l := range res.TmpfsLeft {
				fmt.Fprintf(e.stderr, "cryo: warning: tmpfs file not the job owner's, left as it is: %s\n", l)
			}
			if o.lazy {
				// The job runs already: say so now, then stay to serve its
				// memory (the page server lives in this process).
				if !o.json {
					fmt.Fprintln(e.stdout, res.PID)
				}
				if err := res.Wait(c.Context); err != nil {
					return fmt.Errorf("lazy restore of pid %d: %w", res.PID, err)
				}
				if o.json {
					return o.emit(e, res, nil)
				}
				if o.verbose {
					fmt.Fprintf(e.stderr, "cryo: job started after %s; %s of its memory followed in %s\n",
						(res.Materialize + res.Restore).Round(time.Millisecond), human(res.LazyServed), res.LazyDone.Round(time.Millisecond))
				}
				return nil
			}
			return o.emit(e, res, func(w io.Writer) { fmt.Fprintln(w, res.PID) })
		}),
	}
}
