package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/internal/criu"
	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/drivers"
	ucli "github.com/urfave/cli/v2"
)

// Exit codes.
const (
	ExitOK     = 0
	ExitFailed = 1
	ExitUsage  = 2
)

// usageError marks a mistake in how cryo was called.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// env is what every command needs from the outside world.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
}

// common are the flags every command has.
type common struct {
	json    bool
	verbose bool
	criu    string
	// emitted is set once the command printed its result, so that a
	// failure after it (verify found damage) prints no error object.
	emitted bool
}

func (c *common) flags() []ucli.Flag {
	return []ucli.Flag{
		&ucli.BoolFlag{Name: "json", Usage: "print the result as JSON", Destination: &c.json, EnvVars: []string{"CRYO_JSON"}},
		&ucli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "log what cryo does to stderr", Destination: &c.verbose, EnvVars: []string{"CRYO_VERBOSE"}},
		&ucli.StringFlag{Name: "criu", Usage: "CRIU binary to use (default: $CRYO_CRIU, then criu on PATH)", Destination: &c.criu},
	}
}

func (c *common) logger(e *env) *slog.Logger {
	level := slog.LevelWarn
	if c.verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: level}))
}

// locateCRIU finds the CRIU binary and says which one and why.
func (c *common) locateCRIU(e *env) (criu.Binary, error) {
	return criu.Locate(c.criu, e.getenv)
}

// offload opens the node's offload drivers (GPUs) for the command, once;
// the command closes them when it ends.
func (c *common) offload(e *env) *offload.Registry {
	return drivers.Open(drivers.Config{Getenv: e.getenv, Logger: c.logger(e)})
}

// emit prints v as JSON, or text through the given function.
func (c *common) emit(e *env, v any, text func(w io.Writer)) error {
	c.emitted = true
	if c.json {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	text(e.stdout)
	return nil
}

// checkCache is where a passing `criu check` is remembered, for the
// commands that hand it to the supervisor themselves (run): this
// process's criu.DefaultCheckCache, the one `cryo check` records in, taken
// once (a process keeps its user and environment).
var checkCache = criu.DefaultCheckCache()

// jsonError is what a command given --json prints on stdout when it fails
// before printing a result; the message goes to stderr as always.
type jsonError struct {
	Error string `json:"error"`
	// Code names the failure for scripts: usage, no_store, no_generation,
	// corrupt, locked, pid_in_use, no_process, or failed.
	Code     string `json:"code"`
	ExitCode int    `json:"exit_code"`
}

// errorCode is the jsonError code and exit code of a failure.
func errorCode(err error) (string, int) {
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return "usage", ExitUsage
	case errors.Is(err, cryo.ErrNoStore):
		return "no_store", ExitFailed
	case errors.Is(err, cryo.ErrNoGeneration):
		return "no_generation", ExitFailed
	case errors.Is(err, cryo.ErrCorrupt):
		return "corrupt", ExitFailed
	case errors.Is(err, cryo.ErrLocked):
		return "locked", ExitFailed
	case errors.Is(err, cryo.ErrPIDInUse):
		return "pid_in_use", ExitFailed
	case errors.Is(err, cryo.ErrNoProcess):
		return "no_process", ExitFailed
	}
	return "failed", ExitFailed
}

// action runs a command's action; with --json, a failure before any
// result was printed is printed as a jsonError on stdout, so that a script
// reading stdout always gets one JSON value.
func (c *common) action(e *env, fn ucli.ActionFunc) ucli.ActionFunc {
	return func(ctx *ucli.Context) error {
		err := fn(ctx)
		if err != nil && c.json && !c.emitted {
			code, exit := errorCode(err)
			enc := json.NewEncoder(e.stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(jsonError{Error: err.Error(), Code: code, ExitCode: exit})
		}
		return err
	}
}

func newApp(e *env) *ucli.App {
	app := &ucli.App{
		Name:      "cryo",
		Usage:     "checkpoint and restart HPC jobs, GPU and offload state included",
		Version:   cryo.Version(),
		Writer:    e.stdout,
		ErrWriter: e.stderr,
		Commands: []*ucli.Command{
			checkpointCommand(e),
			restoreCommand(e),
			listCommand(e),
			verifyCommand(e),
			repairCommand(e),
			inspectCommand(e),
			gcCommand(e),
			checkCommand(e),
			gpusCommand(e),
			recoverCommand(e),
			runCommand(e),
			ctlCommand(e),
			migrateCommand(e),
			keygenCommand(e),
			swapCommand(e, "swap-out"),
			swapCommand(e, "swap-in"),
			slurmCommand(e),
			jobInitCommand(e),
			{Name: "version", Usage: "print cryo's version", Action: func(*ucli.Context) error {
				fmt.Fprintln(e.stdout, "cryo", cryo.Version())
				return nil
			}},
		},
		HideHelpCommand: true,
		HideVersion:     true, // -v is --verbose; `cryo version` prints the version
		// --offload takes whole command lines: never split them on commas.
		DisableSliceFlagSeparator: true,
		OnUsageError: func(_ *ucli.Context, err error, _ bool) error {
			return usageError{err.Error()}
		},
		CommandNotFound: func(c *ucli.Context, name string) {
			fmt.Fprintf(e.stderr, "cryo: unknown command %q (see cryo --help)\n", name)
		},
		ExitErrHandler: func(*ucli.Context, error) {}, // we map errors to codes ourselves
	}
	for _, cmd := range app.Commands {
		cmd.OnUsageError = app.OnUsageError
	}
	return app
}

// Main runs cryo with args (args[0] is the program name) and returns the
// exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr, getenv: os.Getenv}
	app := newApp(e)
	if len(args) > 1 && !strings.HasPrefix(args[1], "-") && app.Command(args[1]) == nil && args[1] != "help" {
		fmt.Fprintf(stderr, "cryo: unknown command %q (see cryo --help)\n", args[1])
		return ExitUsage
	}
	err := app.RunContext(ctx, args)
	if err == nil {
		return ExitOK
	}
	var xe exitError
	if errors.As(err, &xe) {
		if xe.err != nil {
			fmt.Fprintf(stderr, "cryo: %s\n", xe.err)
		}
		return xe.code
	}
	fmt.Fprintf(stderr, "cryo: %s\n", err)
	var ue usageError
	if errors.As(err, &ue) || isUsage(err) {
		return ExitUsage
	}
	return ExitFailed
}

// isUsage recognises urfave/cli's own usage complaints.
func isUsage(err error) bool {
	s := err.Error()
	for _, p := range []string{"Required flag", "flag provided but not defined", "invalid value", "flag needs an argument"} {
		if strings.Contains(s, p) {
			return true
		}
	}
	return false
}
