// Package slurm is cryo's Slurm integration, part of cryo's Go API: the
// Slurm job read from its environment (JobFromEnv), its store that
// survives requeues (Job.Store: <root>/cryo-<SLURM_JOB_ID>), asking Slurm
// to requeue it (Job.Requeue), and the Prolog and Epilog hooks that
// prepare and tidy that store as root (`cryo slurm prolog|epilog`, and
// contrib/slurm; see docs/slurm.md).
//
// # Privileges
//
// JobFromEnv, Store and Requeue need none. Prolog and Epilog run as root
// from slurm.conf's hooks: they create, chown and delete in directories
// the job's user controls, and do so through directory file descriptors
// (internal/safefs), never following a symbolic link planted there, and
// refuse a store or root of another user. Both end the processes of
// earlier runs of the job (found by SLURM_JOB_ID and SLURM_CLUSTER_NAME in
// their environment, read through internal/proc), and nothing else. The
// node's GPUs come from its offload drivers (offload/drivers).
//
// Dependencies: it uses the store, monitor's run state (what `cryo run`
// recorded), internal/proc and internal/safefs; the command line (package
// cli) uses it. It never prints: a *slog.Logger may be given, and hooks
// return a HookReport.
package slurm
