package cli

import (
	"bytes"
	"strings"
	"syscall"
	"testing"
)

func TestParseSignal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want syscall.Signal
		err  bool
	}{
		{"USR1", syscall.SIGUSR1, false},
		{"SIGUSR2", syscall.SIGUSR2, false},
		{"usr2", syscall.SIGUSR2, false},
		{"12", syscall.SIGUSR2, false},
		{"HUP", syscall.SIGHUP, false},
		{"KILL", 0, true},
		{"TERM", 0, true}, // already means checkpoint and stop
		{"NOPE", 0, true},
		{"0", 0, true},
	} {
		got, err := parseSignal(tc.in)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("parseSignal(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestRunNeedsStoreOutsideSlurm(t *testing.T) {
	t.Setenv("SLURM_JOB_ID", "")
	t.Setenv("CRYO_STORE", "")
	var out, errb bytes.Buffer
	code := Main(t.Context(), []string{"cryo", "run", "--", "true"}, &out, &errb)
	if code != ExitUsage || !strings.Contains(errb.String(), "needs --store") {
		t.Errorf("cryo run without --store outside Slurm: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	code = Main(t.Context(), []string{"cryo", "run", "--requeue", "--store", t.TempDir(), "--", "true"}, &out, &errb)
	if code != ExitUsage || !strings.Contains(errb.String(), "--requeue needs a Slurm batch job") {
		t.Errorf("cryo run --requeue outside Slurm: exit %d, %q", code, errb.String())
	}
}
