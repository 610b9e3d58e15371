// Package cli is cryo's command line: one file per command, each a
// constructor returning a *cli.Command that binds its flags into a
// per-command options struct and calls the library. It is the only
// package that writes to stdout and stderr.
//
// Exit codes: 0 success, 1 the operation failed, 2 usage error.
package cli
