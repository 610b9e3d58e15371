package cli_test

import (
	"os"
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

// --ghost-limit and --criu-config are checked before anything runs, on
// every command that takes them; --ghost-limit only where CRIU dumps.
func TestCRIULimitFlags(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "store")
	missing := filepath.Join(dir, "none.conf")
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"run: a ghost limit that is not a size", []string{"run", "--store", st, "--ghost-limit", "big", "--", "true"}, `--ghost-limit: "big" is not a size`},
		{"run: more than CRIU takes", []string{"run", "--store", st, "--ghost-limit", "4G", "--", "true"}, "more than CRIU takes"},
		{"run: a missing configuration", []string{"run", "--store", st, "--criu-config", missing, "--", "true"}, "--criu-config: "},
		{"checkpoint: a ghost limit that is not a size", []string{"checkpoint", "--store", st, "--ghost-limit", "1.5M", "1"}, `--ghost-limit: "1.5M" is not a size`},
		{"checkpoint: a missing configuration", []string{"checkpoint", "--store", st, "--criu-config", missing, "1"}, "none.conf"},
		{"restore: a missing configuration", []string{"restore", "--store", st, "--criu-config", missing}, "none.conf"},
		{"restore takes no ghost limit: it dumps nothing", []string{"restore", "--store", st, "--ghost-limit", "8M"}, "ghost-limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{tc.args[0], "--criu=/bin/true"}, tc.args[1:]...)
			code, _, stderr := run(t, args...)
			if code != cli.ExitUsage || !strings.Contains(stderr, tc.msg) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
				t.Errorf("cryo %s: exit %d, stderr %q; want exit 2 and one line saying %q", strings.Join(args, " "), code, stderr, tc.msg)
			}
		})
	}
}

// The flags of migration and standby are refused when they cannot be
// honoured, in one line with exit 2; a key file anyone else may read is
// refused before the job is asked anything (exit 1).
func TestMigrationFlags(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "store")
	key := filepath.Join(dir, "key")
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"a command with --receive", []string{"run", "--store", st, "--receive", "127.0.0.1:0", "--key", key, "--", "true"}, "give no command"},
		{"--receive without --key", []string{"run", "--store", st, "--receive", "127.0.0.1:0"}, "need --key"},
		{"--standby without --key", []string{"run", "--store", st, "--standby", "127.0.0.1:1", "--", "true"}, "need --key"},
		{"--key alone", []string{"run", "--store", st, "--key", key, "--", "true"}, "--key is for --receive and --standby"},
		{"--standby with --receive", []string{"run", "--store", st, "--receive", "127.0.0.1:0", "--standby", "127.0.0.1:1", "--key", key}, "--standby is for the job's own node"},
		{"migrate without --to", []string{"migrate", "--store", st, "--key", key}, "--to"},
		{"migrate without a store", []string{"migrate", "--to", "127.0.0.1:1", "--key", key}, "--store"},
		{"migrate without --key", []string{"migrate", "--store", st, "--to", "127.0.0.1:1"}, "--key"},
		{"migrate with no rounds", []string{"migrate", "--store", st, "--to", "127.0.0.1:1", "--key", key, "--rounds", "0"}, "--rounds"},
		{"keygen without a file", []string{"keygen"}, "keygen needs FILE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := run(t, tc.args...)
			if code != cli.ExitUsage || !strings.Contains(stderr, tc.msg) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
				t.Errorf("cryo %s: exit %d, stderr %q; want exit 2 and one line saying %q", strings.Join(tc.args, " "), code, stderr, tc.msg)
			}
		})
	}
	if code, _, stderr := run(t, "keygen", key); code != 0 {
		t.Fatalf("keygen: exit %d: %s", code, stderr)
	}
	if code, _, stderr := run(t, "keygen", key); code != 1 || !strings.Contains(stderr, key) {
		t.Errorf("keygen over an existing key: exit %d, %q; want 1 naming the file", code, stderr)
	}
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := run(t, "migrate", "--store", st, "--to", "127.0.0.1:1", "--key", key)
	if code != 1 || !strings.Contains(stderr, "group or others") || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
		t.Errorf("migrate with a key others may read: exit %d, %q; want 1 and one line about its mode", code, stderr)
	}
}
