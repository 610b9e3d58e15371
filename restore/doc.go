// Package restore brings a job back from a committed generation.
//
// Restore runs: pick the generation -> preflight (CRIU vetted, every PID
// and thread ID of the job free: no process, process group or session
// holds it, or only a dying one that we wait for; a live holder is refused
// and never signalled; the job's offload contexts placed: the recorded
// GPUs, else same-model ones with room, or a device map, refused when none
// fits) -> with TruncateOutputs, the job's output files cut back to their
// sizes at the checkpoint (only files that are still the recorded inode) ->
// materialize the images into a private RAM-backed work directory,
// verifying every chunk's checksum before any process starts -> CRIU
// restore (detached in its own session, or as a child of the caller) ->
// restore every offload context onto its GPUs and unlock it (if that
// fails, the restored job is killed: it cannot run without its device
// state, and the checkpoint can be tried again) -> report the restored
// root PID.
//
// A job in PID namespaces of its own (cryo run's: its root is their PID 1)
// comes back in fresh ones: its PIDs need not be free on the node, and its
// offload contexts follow its processes to the PIDs they have on the node
// now, found by those they have in the job's namespace (a context whose
// process is not found fails the restore, as above).
//
// A job not in namespaces of its own gets back, before CRIU runs, the
// tmpfs files it mapped or held open (its POSIX shared memory) as they were
// at the checkpoint, where they are missing or changed: made and opened as
// the job's owner (as root, with the owner's file-system identity), never
// through a link, and only the owner's (tmpfs.go, internal/tmpfs).
//
// It reads the store under a shared lock (so retention and GC wait) and
// never modifies a generation. Outside the store it changes no file but
// the output files TruncateOutputs cuts and those tmpfs files.
package restore
