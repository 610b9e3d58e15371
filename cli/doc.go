// Package cli is cryo's command line: one file per command, each a
// constructor returning a *cli.Command that binds its flags into a
// per-command options struct and calls the library: package cryo for
// every operation on a store, slurm for the hooks, monitor for
// supervision. It opens the node's offload drivers once per command and
// passes them down. It is the only package that writes to stdout and
// stderr; sizes are printed in MiB.
//
// Exit codes: 0 success, 1 the operation failed, 2 usage error (a
// one-line message naming what is wrong). With --json, a command that
// fails before printing its result prints a JSON error object (error,
// code, exit_code) on stdout.
package cli
