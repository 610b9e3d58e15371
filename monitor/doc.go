// Package monitor supervises jobs: it starts a job's trees under one
// job-init process, takes periodic checkpoints, watches for failures (a tree
// exiting abnormally, a broken host-offload channel, a missed heartbeat, a
// hung offload process, GPU Xid errors, memory growth), and on failure
// terminates what is left of the job and restores it from the newest good
// generation, falling back to older ones, with backoff, up to a limit.
//
// The supervisor stays outside the checkpointed tree. The job's root is
// job-init (RunInit), a small reaper started by the supervisor in its own
// session; the host tree and each offload tree are its children, each in a
// session of its own. One CRIU dump of job-init therefore freezes and
// captures every tree at once, with the pipes, unix sockets and TCP
// connections between them. After restore, job-init comes back as the
// supervisor's child (CRIU's restore-as-sibling), so its exit status is
// seen.
//
// It uses checkpoint and restore for the work, and must not print: it
// reports through Events, Status and Metrics.
package monitor
