package criu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A failed restore or dump is reported by one line of CRIU's log, and one
// that recurs (a missing file, a limit) is marked so that a supervisor does
// not retry it.
func TestErrorClassifies(t *testing.T) {
	cases := []struct {
		name, log  string
		reason     string
		recurs     bool
		briefParts []string
	}{
		{
			name: "missing file on restore",
			log: "(00.001) Warn (criu/x.c:1): something\n" +
				"(00.002) Error (criu/util.c:1538): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n" +
				"(00.003)     51: Error (criu/files-reg.c:2156): Can't open file tmp/ompi.vm.0/pid.2643/hwloc.sm on restore: No such file or directory\n" +
				"(00.004) Error (criu/cr-restore.c:1480): 51 exited, status=1\n" +
				"(00.005) Error (criu/cr-restore.c:2600): Restoring FAILED.\n",
			reason: "Can't open file tmp/ompi.vm.0/pid.2643/hwloc.sm on restore: No such file or directory",
			recurs: true, briefParts: []string{"a file the job had open is gone", "CRIU's log: "},
		},
		{
			name:   "ghost limit",
			log:    "(00.1) Error (criu/files-reg.c:930): Can't dump ghost file /dev/shm/ucx_shm_posix_1 of 4296704 size, increase limit\n(00.2) Error (criu/cr-dump.c:2000): Dumping FAILED.\n",
			reason: "Can't dump ghost file /dev/shm/ucx_shm_posix_1 of 4296704 size, increase limit", recurs: true,
			briefParts: []string{"larger than CRIU's ghost limit", "--ghost-limit raises it"},
		},
		{
			name: "a port in use may pass",
			log: "(00.1)     1: Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 96): Address already in use\n" +
				"(00.2) Error (criu/cr-restore.c:2600): Restoring FAILED.\n",
			reason: "inet: Can't bind inet socket (id 96): Address already in use", recurs: false,
			briefParts: []string{"a port the job listens on is in use on this node", "TIME_WAIT"},
		},
		{
			name:   "a taken pid is not recurring",
			log:    "(00.1) Error (criu/cr-restore.c:1500): Can't fork for 10286: File exists\n(00.2) Error (criu/cr-restore.c:2600): Restoring FAILED.\n",
			reason: "Can't fork for 10286: File exists", recurs: false,
		},
		{
			name:   "only consequences",
			log:    "(00.1) Error (criu/cr-restore.c:1480): 51 exited, status=1\n",
			reason: "51 exited, status=1", recurs: false,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "restore.log")
			if err := os.WriteFile(p, []byte(tc.log), 0o600); err != nil {
				t.Fatal(err)
			}
			e := &Error{Err: errors.New("criu RESTORE failed"), Log: p}
			wrapped := fmt.Errorf("restore generation 3: %w", e)
			if got := e.Reason(); got != tc.reason {
				t.Errorf("Reason() = %q, want %q", got, tc.reason)
			}
			if got := errors.Is(wrapped, ErrRecurring); got != tc.recurs {
				t.Errorf("errors.Is(err, ErrRecurring) = %v, want %v", got, tc.recurs)
			}
			if got, want := errors.Is(wrapped, ErrAddressInUse), strings.Contains(tc.reason, "Address already in use"); got != want {
				t.Errorf("errors.Is(err, ErrAddressInUse) = %v, want %v", got, want)
			}
			b := e.Brief()
			if strings.Contains(b, "\n") || !strings.Contains(b, tc.reason) || !strings.Contains(b, p) {
				t.Errorf("Brief() = %q: want one line with the reason and the log's path", b)
			}
			for _, part := range tc.briefParts {
				if !strings.Contains(b, part) {
					t.Errorf("Brief() = %q lacks %q", b, part)
				}
			}
		})
	}
	// No log: the RPC error is the reason, and nothing is known to recur.
	e := &Error{Err: errors.New("criu RESTORE failed"), Log: filepath.Join(t.TempDir(), "none.log")}
	if e.Reason() != "criu RESTORE failed" || errors.Is(e, ErrRecurring) {
		t.Errorf("without a log: Reason %q, recurring %v", e.Reason(), errors.Is(e, ErrRecurring))
	}
}
