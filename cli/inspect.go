package cli

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

type inspectOpts struct {
	common
	store      string
	generation int
	files      bool
}

func inspectCommand(e *env) *ucli.Command {
	o := &inspectOpts{}
	return &ucli.Command{
		Name:  "inspect",
		Usage: "describe a checkpoint from the store: process tree, command lines, memory, open files and sockets, offload contexts, dump statistics, storage",
		Flags: append(o.common.flags(),
			&ucli.StringFlag{Name: "store", Usage: "store directory", Destination: &o.store, EnvVars: []string{"CRYO_STORE"}, Required: true},
			&ucli.IntFlag{Name: "generation", Usage: "generation to inspect (default: newest)", Destination: &o.generation},
			&ucli.BoolFlag{Name: "files", Usage: "list the stored image files too", Destination: &o.files},
		),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("inspect takes no arguments, got %q", c.Args().Slice())
			}
			if o.generation < 0 {
				return usagef("--generation must be >= 1, got %d", o.generation)
			}
			r, err := cryo.Inspect(c.Context, cryo.InspectOptions{Store: o.store, Generation: o.generation})
			if err != nil {
				return err
			}
			return o.emit(e, r, func(w io.Writer) { printInspect(w, r, o.files) })
		}),
	}
}

func printInspect(w io.Writer, r *cryo.Inspection, files bool) {
	fmt.Fprintf(w, "generation %d of %s\n", r.Generation, r.Store)
	fmt.Fprintf(w, "  created %s on %s by %s, CRIU %s", r.Created.Local().Format(time.DateTime), orDash(r.Host), orDash(r.CreatedBy), orDash(r.CRIU.Version))
	if r.CRIU.LeaveRunning {
		fmt.Fprint(w, ", job left running")
	}
	fmt.Fprintln(w)

	fmt.Fprintf(w, "\nprocesses (%d):\n", len(r.Processes))
	pids := map[int]bool{}
	children := map[int][]int{} // by PPID, indices into r.Processes
	for _, p := range r.Processes {
		pids[p.PID] = true
	}
	var roots []int
	for i, p := range r.Processes {
		if pids[p.PPID] && p.PPID != p.PID {
			children[p.PPID] = append(children[p.PPID], i)
		} else {
			roots = append(roots, i)
		}
	}
	var show func(i, depth int)
	show = func(i, depth int) {
		p := r.Processes[i]
		ind := strings.Repeat("    ", depth)
		cmd := ""
		if len(p.Cmdline) > 0 {
			cmd = "  " + shellQuote(p.Cmdline)
		}
		fmt.Fprintf(w, "  %s%d %s (ppid %d, %d threads)%s\n", ind, p.PID, p.Comm, p.PPID, p.Threads, cmd)
		m := p.Memory
		fmt.Fprintf(w, "  %s    memory: %s dumped in %d pages (%d zero), %s mapped in %d VMAs; pages: anon %d, anon shared %d, file %d, file shared %d, other %d\n",
			ind, human(m.DumpedBytes), m.Pages, m.ZeroPages, human(m.MappedBytes), m.VMAs,
			m.AnonPrivatePages, m.AnonSharedPages, m.FilePrivatePages, m.FileSharedPages, m.OtherPages)
		for _, fd := range p.FDs {
			desc := fd.Desc
			if desc == "" {
				desc = "-"
			}
			fmt.Fprintf(w, "  %s    fd %-4s %-8s %s\n", ind, fd.FD, fd.Type, desc)
		}
		for _, c := range children[p.PID] {
			show(c, depth+1)
		}
	}
	for _, i := range roots {
		show(i, 0)
	}
	fmt.Fprintf(w, "  total: %s dumped in %d pages (%d zero)\n", human(r.Memory.DumpedBytes), r.Memory.Pages, r.Memory.ZeroPages)

	if len(r.Offload) > 0 {
		fmt.Fprintf(w, "\noffload contexts (%d):\n", len(r.Offload))
		for _, c := range r.Offload {
			fmt.Fprintf(w, "  %s pid %d", c.Kind, c.PID)
			if c.State != "" {
				fmt.Fprintf(w, " (%s)", c.State)
			}
			for _, d := range c.Devices {
				fmt.Fprintf(w, "; device %d %s %s", d.Index, d.UUID, d.Model)
				if d.Memory > 0 {
					fmt.Fprintf(w, " %s", human(int64(d.Memory)))
				}
			}
			if len(c.Devices) == 0 && c.Device != "" {
				fmt.Fprintf(w, "; device %s", c.Device)
			}
			fmt.Fprintln(w)
		}
	}

	if len(r.TmpfsFiles) > 0 {
		fmt.Fprintf(w, "\ntmpfs files (%d), brought back before a restore:\n", len(r.TmpfsFiles))
		for _, f := range r.TmpfsFiles {
			note := ""
			if f.AppendOnly {
				note = ", appended to only: made again only if missing"
			}
			fmt.Fprintf(w, "  %s  %s, mode %#o, uid %d gid %d%s\n", f.Path, human(f.Size), f.Mode, f.UID, f.GID, note)
		}
	}

	d := r.Dump
	fmt.Fprintf(w, "\nCRIU dump: freezing %d ms, frozen %d ms, memdump %d ms, memwrite %d ms; pages scanned %d, written %d; dump call %d ms, durable after %d ms\n",
		d.FreezingMS, d.FrozenMS, d.MemdumpMS, d.MemwriteMS, d.PagesScanned, d.PagesWritten, d.DumpMS, d.DurableMS)

	s := r.Storage
	fmt.Fprintf(w, "\nstorage: %s of images in %d chunks (%d zero, %s, not stored)\n", human(s.RawBytes), s.Chunks, s.ZeroChunks, human(s.ZeroBytes))
	fmt.Fprintf(w, "  %s of data stored as %s: compression %.2fx\n", human(s.DataBytes), human(s.StoredBytes), s.CompressionRatio)
	fmt.Fprintf(w, "  %d distinct chunks, %s; %d of them (%s) shared with generations %v\n",
		s.UniqueChunks, human(s.UniqueBytes), s.SharedChunks, human(s.SharedBytes), s.OtherGenerations)
	if s.NewBytes > 0 {
		fmt.Fprintf(w, "  added %d chunks, %s, to the store: dedup %.2fx\n", s.NewChunks, human(s.NewBytes), s.DedupRatio)
	} else {
		fmt.Fprintln(w, "  added nothing to the store: all its chunks were there already")
	}
	fmt.Fprintf(w, "  manifest format %d; %d chunks stored as page deltas; in %d pack files\n", s.Format, s.DeltaChunks, len(s.Packs))
	if files {
		fmt.Fprintln(w, "\nfiles:")
		for _, f := range r.Files {
			fmt.Fprintf(w, "  %-24s %-6s %10s in %d chunks (%d zero), %s stored\n", f.Name, f.Kind, human(f.Size), f.Chunks, f.ZeroChunks, human(f.StoredBytes))
		}
	}
	for _, wn := range r.Warnings {
		fmt.Fprintf(w, "warning: %s\n", wn)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// shellQuote renders a command line as a shell would read it back.
func shellQuote(argv []string) string {
	out := make([]string, len(argv))
	for i, a := range argv {
		if a == "" || strings.ContainsAny(a, " \t\n'\"\\$`;&|<>()*?[]#~") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}
