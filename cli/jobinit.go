package cli

import (
	"encoding/json"
	"os"

	"github.com/cryo-hpc/cryo/monitor"
	ucli "github.com/urfave/cli/v2"
)

// jobInitCommand is the job's root process, started by `cryo run`; not for
// people to call.
func jobInitCommand(e *env) *ucli.Command {
	return &ucli.Command{
		Name:   "job-init",
		Hidden: true,
		Action: func(c *ucli.Context) error {
			var spec monitor.InitSpec
			if err := json.Unmarshal([]byte(os.Getenv(monitor.InitEnv)), &spec); err != nil {
				return usagef("job-init is started by cryo run (no valid %s)", monitor.InitEnv)
			}
			os.Unsetenv(monitor.InitEnv)
			code := monitor.RunInit(spec)
			if code != 0 {
				return exitError{code: code}
			}
			return nil
		},
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
