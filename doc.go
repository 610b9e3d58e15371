// Package cryo is cryo's Go API, for schedulers and tools that manage
// jobs, and the one door the cryo command line goes through: every
// operation of `cryo` that works on a store is a call here, with the same
// options, results and errors.
//
//	Checkpoint  cryo checkpoint, cryo swap-out    a process tree into a new generation
//	Restore     cryo restore, cryo swap-in        the newest (or a chosen) generation
//	List        cryo list                         generations with a quick integrity check
//	Verify      cryo verify                       re-hash every chunk, name what is damaged
//	Repair      cryo repair                       heal damage from a replica
//	GC          cryo gc                           retention and unreferenced chunks
//	Inspect     cryo inspect                      describe a checkpoint from the store alone
//	Recover     cryo recover                      undo what a killed cryo left locked or stopped
//	GPUs        cryo gpus                         the node's GPUs and its checkpoint API
//	RunState    (cryo run)                        what cryo run last recorded in a store
//
// The results are what the command's --json prints. Supervision (`cryo
// run`) is package monitor; the Slurm job, its store and requeue, and the
// Prolog/Epilog are package slurm.
//
// # A store
//
// A store is a directory that holds one job's checkpoints as numbered
// generations (1, 2, ...). A generation is committed atomically: it is
// either complete or absent. Chunks of memory are shared between
// generations, so a new generation costs only what changed. Every chunk is
// hashed; Restore verifies all of them before the job runs, and with
// Fallback passes over a damaged generation for the newest older intact
// one.
//
// # Hardware
//
// GPU state goes through the node's offload drivers. A process that
// checkpoints or restores more than once opens them once
// (offload/drivers.Open), passes the registry in the options and closes it
// at the end; without one, each call opens and closes them itself.
//
// # Privileges
//
// Checkpoint, Restore and Recover drive CRIU or the job's processes, which
// needs root. List, Verify, Inspect and RunState do not; Repair and GC
// need write access to the store.
//
// # Errors
//
// Failures wrap the sentinels below; test them with errors.Is. A damaged
// generation is ErrCorrupt, a store that is busy is ErrLocked, a restore
// whose PIDs are taken is ErrPIDInUse.
//
// Dependencies point one way: this package uses monitor (for the run state
// that `cryo run` records), checkpoint, restore, offload and the store;
// the command line (package cli) uses this package. Nothing here prints:
// a *slog.Logger may be given, and results are returned as values.
package cryo
