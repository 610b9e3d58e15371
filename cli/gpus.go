package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/offload/nvml"
	ucli "github.com/urfave/cli/v2"
)

type gpusOpts struct{ common }

func gpusCommand(e *env) *ucli.Command {
	o := &gpusOpts{}
	return &ucli.Command{
		Name:  "gpus",
		Usage: "show this node's NVIDIA driver, GPUs and CUDA processes, and whether cryo can checkpoint them",
		Description: "Reads NVML (libnvidia-ml.so.1, or $CRYO_LIBNVML) and the CUDA driver (libcuda.so.1, or $CRYO_LIBCUDA).\n" +
			"A node without an NVIDIA driver has no GPUs: that is reported, not an error.",
		Flags: o.common.flags(),
		Action: o.action(e, func(c *ucli.Context) error {
			if c.NArg() != 0 {
				return usagef("gpus takes no arguments, got %q", c.Args().Slice())
			}
			reg := o.offload(e)
			defer reg.Close()
			st := cryo.GPUs(reg)
			return o.emit(e, st, func(w io.Writer) { printGPUs(w, st) })
		}),
	}
}

func printGPUs(w io.Writer, st cryo.GPUStatus) {
	if !st.HasDriver() {
		fmt.Fprintln(w, "no NVIDIA driver on this node: it has no GPUs for cryo")
		fmt.Fprintf(w, "  NVML: %s\n  CUDA: %s\n", st.NVMLProblem, st.CUDAProblem)
		return
	}
	if st.NVML {
		fmt.Fprintf(w, "NVIDIA driver %s", st.DriverVersion)
	} else {
		fmt.Fprintf(w, "no NVML (%s)", strings.TrimPrefix(st.NVMLProblem, nvml.ErrNoNVML.Error()+": "))
	}
	if st.CUDA {
		fmt.Fprintf(w, "; CUDA driver API %s\n", st.CUDAVersion)
	} else {
		fmt.Fprintf(w, "; no CUDA driver (%s)\n", st.CUDAProblem)
	}
	switch {
	case st.CheckpointAPI:
		remap := "yes"
		if !st.GPURemap {
			remap = "no (needs CUDA 13.0, driver r580, or newer)"
		}
		fmt.Fprintf(w, "checkpoint API: available; restore onto other GPUs: %s\n", remap)
	case st.CUDA:
		fmt.Fprintf(w, "checkpoint API: not available: %s\n", st.CheckpointProblem)
	}
	if len(st.GPUs) == 0 {
		fmt.Fprintln(w, "no GPUs")
		return
	}
	if st.GPUsFrom == "cuda" {
		fmt.Fprintln(w, "GPUs as the CUDA driver sees them (without NVML: no processes, no memory in use):")
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tUUID\tMODEL\tMEMORY\tPERSISTENCE\tPROCESSES")
	for _, g := range st.GPUs {
		mem := human(int64(g.MemoryTotal))
		if g.MemoryUsed != nil {
			mem = human(int64(*g.MemoryUsed)) + " / " + mem
		}
		persist := "-"
		if g.Persistence != nil {
			persist = map[bool]string{true: "on", false: "off"}[*g.Persistence]
		}
		var procs []string
		for _, p := range g.Processes {
			s := fmt.Sprintf("%d (%s", p.PID, human(int64(p.Memory)))
			if p.State != "" {
				s += ", " + p.State
			}
			procs = append(procs, s+")")
		}
		if len(procs) == 0 {
			procs = []string{"-"}
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", g.Index, g.UUID, g.Model, mem, persist, strings.Join(procs, " "))
	}
	tw.Flush()
}
