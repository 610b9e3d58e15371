// Package cryo is cryo's Go API for schedulers and tools that manage jobs:
// checkpoint a job's process tree into its store, restore it, list the
// store's generations and verify them, and the per-job store conventions
// that `cryo run` and the Slurm Prolog/Epilog follow.
//
// These are the calls the cryo command line makes: Checkpoint and Restore
// run the same checkpoint and restore code as `cryo checkpoint` and
// `cryo restore`; List and Verify report what `cryo list` and `cryo
// verify` report; SlurmJobFromEnv, SlurmJob.Store and SlurmJob.Requeue are
// how `cryo run` finds a Slurm job's store and requeues it; SlurmProlog and
// SlurmEpilog are `cryo slurm prolog` and `cryo slurm epilog`.
//
// # A store
//
// A store is a directory that holds one job's checkpoints as numbered
// generations (1, 2, ...). A generation is committed atomically: it is
// either complete or absent. Chunks of memory are shared between
// generations, so a new generation costs only what changed. Every chunk is
// hashed; Restore re-verifies all of them before any process starts, and
// falls back to an older generation when the newest is damaged.
//
// # Privileges
//
// Checkpoint and Restore drive CRIU, which needs root. List, Verify and the
// Slurm store helpers do not. SlurmProlog and SlurmEpilog are meant to run
// as root from a scheduler's hooks: they create, chown and delete
// directories in places the job's user controls, and do so without
// following symbolic links planted there.
//
// # Errors
//
// Failures wrap the sentinels below; test them with errors.Is. A damaged
// generation is ErrCorrupt, a store that is busy is ErrLocked, a restore
// whose PIDs are taken is ErrPIDInUse.
//
// Dependencies point one way: this package uses checkpoint, restore,
// monitor (for the run state that `cryo run` records) and the store; the
// command line (package cli) uses this package. Nothing here prints: a
// *slog.Logger may be given, and results are returned as values.
package cryo
