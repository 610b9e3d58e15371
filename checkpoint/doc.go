// Package checkpoint takes a consistent snapshot of a job and commits it to
// a store as a new generation.
//
// Take runs: preflight (CRIU vetted, target alive, room for the images;
// offload state that a killed cryo left behind recovered) -> quiesce the
// job's offload contexts (offload.Quiesce: lock all, then checkpoint all,
// so device state is in host memory) -> CRIU dump into a private RAM-backed
// work directory -> the job resumes, its offload contexts restored and
// unlocked (or, with Kill, it stays stopped) -> persist: chunk, hash and
// compress the images into the store in parallel, with a record of the
// job's output files and their sizes at the freeze (outputs.json) and, for
// a job not in namespaces of its own, the contents of the tmpfs files it
// maps or holds open, copied while it was frozen (tmpfs-files.json and its
// parts; see tmpfs.go) -> the caller's Accept, which may refuse the
// generation -> commit (syncfs, manifest, atomic rename) -> retention.
// Every step is undone if a later one fails: a failed checkpoint leaves
// the job running as it was (its offload contexts unlocked) and older
// generations intact.
//
// It owns the order of these steps; the store format belongs to
// internal/store and CRIU's options to internal/criu. It must not print:
// it logs through the injected *slog.Logger and returns a Result.
package checkpoint
