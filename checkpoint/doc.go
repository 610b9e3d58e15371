// Package checkpoint takes a consistent snapshot of a job and commits it to
// a store as a new generation.
//
// Take runs: preflight (CRIU vetted, target alive, room for the images) ->
// CRIU dump into a private RAM-backed work directory -> the job resumes (or,
// with Kill, stays stopped) -> persist: chunk, hash and compress the images
// into the store in parallel -> commit (syncfs, manifest, atomic rename) ->
// retention. Every step is undone if a later one fails: a failed
// checkpoint leaves the job running as it was and older generations intact.
//
// It owns the order of these steps; the store format belongs to
// internal/store and CRIU's options to internal/criu. It must not print:
// it logs through the injected *slog.Logger and returns a Result.
package checkpoint
