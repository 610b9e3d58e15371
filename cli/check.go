package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/internal/jobns"
	"github.com/cryo-hpc/cryo/internal/privilege"
	ucli "github.com/urfave/cli/v2"
)

type checkOpts struct{ common }

func checkCommand(e *env) *ucli.Command {
	o := &checkOpts{}
	return &ucli.Command{
		Name:  "check",
		Usage: "say which CRIU cryo would use, whether it works here for you (root or a user), and what an admin must fix if not",
		Flags: o.common.flags(),
		Action: func(c *ucli.Context) error {
			bin, err := o.locateCRIU(e)
			if err != nil {
				return err
			}
			// Afresh, and what checkpoints will trust from now on.
			bin, err = criu.Check(c.Context, bin, criu.DefaultCheckCache())
			user := !privilege.Root()
			out := struct {
				Path       string         `json:"path"`
				Source     string         `json:"found_via"`
				Version    string         `json:"version,omitempty"`
				Mode       string         `json:"mode"` // "user" (CRIU runs unprivileged, as you) or "root"
				OK         bool           `json:"ok"`
				Problem    string         `json:"problem,omitempty"`
				Namespaces bool           `json:"job_namespaces"`
				NoNS       string         `json:"job_namespaces_problem,omitempty"`
				Features   *criu.Features `json:"features,omitempty"`
			}{Path: bin.Path, Source: bin.Source, OK: err == nil, Mode: map[bool]string{true: "user", false: "root"}[user]}
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
			if nerr := jobns.Probe(user); nerr != nil {
				out.NoNS = nerr.Error()
			} else {
				out.Namespaces = true
			}
			if perr := o.emit(e, out, func(w io.Writer) {
				fmt.Fprintf(w, "criu: %s (found via %s)\n", out.Path, out.Source)
				if out.Version != "" {
					fmt.Fprintf(w, "version: %s\n", out.Version)
				}
				if user {
					fmt.Fprintf(w, "mode: user (uid %d): CRIU runs as you, unprivileged, on your own processes\n", os.Getuid())
				} else {
					fmt.Fprintln(w, "mode: root")
				}
				if out.OK {
					fmt.Fprintln(w, "criu check: looks good")
				}
				if out.Namespaces {
					fmt.Fprintln(w, "job namespaces (cryo run): available: own PID, IPC and mount namespaces, private /proc, /dev/shm and TMPDIR")
				} else {
					fmt.Fprintf(w, "job namespaces (cryo run): not available: %s\n", out.NoNS)
				}
				if user {
					fmt.Fprintln(w, "TCP connections: cannot be checkpointed in user mode (TCP repair needs CAP_NET_ADMIN); connect a job's trees over unix sockets")
				}
				if f := out.Features; f != nil {
					if f.DirtyTracking {
						fmt.Fprintln(w, "memory change tracking (soft-dirty): available")
					} else {
						fmt.Fprintln(w, "memory change tracking (soft-dirty): not in this kernel; incremental checkpoints rely on content dedup")
					}
					lazy := map[bool]string{true: "available", false: "not available"}[f.LazyPages]
					if !f.LazyPages && user && sysctlIs("/proc/sys/vm/unprivileged_userfaultfd", "0") {
						lazy += " to users (vm.unprivileged_userfaultfd = 0); an admin runs: sysctl -w vm.unprivileged_userfaultfd=1"
					}
					fmt.Fprintf(w, "lazy restore (userfaultfd): %s\n", lazy)
				}
			}); perr != nil {
				return perr
			}
			return err
		},
	}
}

func sysctlIs(path, v string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.TrimSpace(string(b)) == v
}

func contextWithTimeout(c *ucli.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, d)
}
