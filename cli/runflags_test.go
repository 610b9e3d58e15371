package cli_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryo-hpc/cryo/cli"
)

// Every cryo run flag is honoured, or refused in one line: none is
// dropped. These are refused before anything starts.
func TestRunRefusesFlagsItCannotHonour(t *testing.T) {
	st := filepath.Join(t.TempDir(), "store")
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"--mtbf without --interval auto", []string{"--interval", "10m", "--mtbf", "24h"}, "--mtbf is for --interval auto"},
		{"--interval auto without --mtbf", []string{"--interval", "auto"}, "needs --mtbf"},
		{"--hang-timeout without offload trees", []string{"--hang-timeout", "1m"}, "--hang-timeout watches offload trees"},
		{"--channel-grace without offload trees", []string{"--channel-grace", "5s"}, "--channel-grace watches channels"},
		{"negative --grace", []string{"--grace", "-1s"}, "must be >= 0"},
		{"the node daemon is gone", []string{"--monitor", "/run/cryo/monitor.sock"}, "monitor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string{"run", "--criu=/bin/true", "--store", st}, tc.args...), "--", "true")
			code, _, stderr := run(t, args...)
			if code != cli.ExitUsage || !strings.Contains(stderr, tc.msg) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
				t.Errorf("cryo %s: exit %d, stderr %q; want exit 2 and one line saying %q", strings.Join(args, " "), code, stderr, tc.msg)
			}
		})
	}
	if code, _, stderr := run(t, "monitor"); code != cli.ExitUsage || !strings.Contains(stderr, "unknown command") {
		t.Errorf("cryo monitor: exit %d, %q; want it gone", code, stderr)
	}
	if code, _, stderr := run(t, "ctl", "status"); code != cli.ExitUsage || !strings.Contains(stderr, "--store") {
		t.Errorf("cryo ctl without a store: exit %d, %q", code, stderr)
	}
}
