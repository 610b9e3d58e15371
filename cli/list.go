package cli

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
	ucli "github.com/urfave/cli/v2"
)

type listOpts struct {
	common
	store string
}

// genInfo is one line of `cryo list`.
type genInfo struct {
	Generation  int       `json:"generation"`
	Created     time.Time `json:"created,omitzero"`
	RootPID     int       `json:"root_pid,omitempty"`
	Processes   int       `json:"processes"`
	RawBytes    int64     `json:"raw_bytes"`
	StoredBytes int64     `json:"stored_bytes"`
	Intact      bool      `json:"intact"`
	Problem     string    `json:"problem,omitempty"`
}

func listCommand(e *env) *ucli.Command {
	o := &listOpts{}
	return &ucli.Command{
		Name:  "list",
		Usage: "list the generations of a store with time, size, process count and whether each is intact",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
		),
		Action: func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("list takes no arguments, got %q", c.Args().Slice())
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
			gens, err := st.Generations()
			if err != nil {
				return err
			}
			infos := []genInfo{}
			for _, g := range gens {
				infos = append(infos, describe(st, g))
			}
			return o.emit(e, infos, func(w io.Writer) {
				if len(infos) == 0 {
					fmt.Fprintf(w, "no checkpoints in %s\n", st.Dir)
					return
				}
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "GEN\tCREATED\tPROCS\tIMAGES\tSTORED\tSTATE")
				for _, i := range infos {
					state := "intact"
					if !i.Intact {
						state = "BROKEN: " + i.Problem
					}
					created := "-"
					if !i.Created.IsZero() {
						created = i.Created.Local().Format("2006-01-02 15:04:05")
					}
					fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\n", i.Generation, created, i.Processes, human(i.RawBytes), human(i.StoredBytes), state)
				}
				tw.Flush()
			})
		},
	}
}

// describe summarises a generation; "intact" means the manifest checks out
// and every chunk is present with its recorded size (cryo verify re-hashes).
func describe(st *store.Store, g int) genInfo {
	info := genInfo{Generation: g}
	m, err := st.ReadManifest(g)
	if err != nil {
		info.Problem = err.Error()
		return info
	}
	info.Created, info.RootPID, info.Processes = m.Created, m.Job.RootPID, len(m.Job.Processes)
	info.RawBytes, info.StoredBytes = m.Stats.RawBytes, m.Stats.StoredBytes
	if ps := st.Quick(m); len(ps) > 0 {
		info.Problem = ps[0].String()
		if len(ps) > 1 {
			info.Problem += fmt.Sprintf(" (+%d more)", len(ps)-1)
		}
		return info
	}
	info.Intact = true
	return info
}
