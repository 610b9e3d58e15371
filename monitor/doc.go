// Package monitor supervises jobs (`cryo run`): it starts a job's trees
// under one job-init process, takes periodic checkpoints, watches for
// failures (a crash, or a host exit code of 128+N by which an MPI launcher
// reports a rank killed by signal N; an offload tree ending while the host
// needs it, a broken host-offload channel, a missed heartbeat, a hung
// offload tree, GPU Xid errors; it warns of memory growth), and on a
// failure ends every process of the job and restores it.
//
// The Supervisor is a loop that carries out decisions made by pure
// functions of what happened (policy.go: what an end of the job means,
// which generation to restore, when to give up, what to keep), through an
// Engine (engine.go: start, checkpoint, restore, terminate; CRIU through
// the checkpoint and restore packages, or a fake in tests).
//
// The supervisor stays outside the checkpointed tree. The job's root is
// job-init (RunInit), started by the supervisor in its own session; the
// host tree and each offload tree are its children, each in a session of
// its own. One CRIU dump of job-init therefore freezes and captures every
// tree at once, with the pipes, unix sockets and TCP connections between
// them. After restore, job-init comes back as the supervisor's child
// (CRIU's restore-as-sibling), so its exit status is seen. job-init is the
// subreaper of the whole job and never exits while a process of it lives;
// the supervisor is the subreaper of job-init's orphans.
//
// It signals only processes of the job, each pinned by a pidfd with its
// start time checked (reap.go); never a process outside the job. It uses
// checkpoint and restore for the work, and must not print: it reports
// through Events, Status and Metrics. It serves one job's control socket
// (ServeControl); there is no daemon for many jobs.
package monitor
