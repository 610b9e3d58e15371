package store

import (
	"os"
	"syscall"
)

// CrashEnv names a step at which cryo kills itself with SIGKILL, for the
// reliability tests: whatever step of a commit or of a garbage collection
// cryo dies at, the store must verify and every committed generation must
// restore. The steps are "pack-written" (a pack is whole and fsynced but
// not yet renamed from .tmp), "chunks-written" (every pack is durable, no
// manifest yet), "manifest-written" (the manifest is in staging, just
// before the rename that commits), "renamed" (committed, directory not yet
// synced), "repack-written" (a GC's new packs are durable, the old ones
// all still there) and "gc" (a garbage collection that has removed one
// pack or chunk file).
const CrashEnv = "CRYO_TEST_CRASH_AT"

// CrashPoint kills cryo with SIGKILL when CrashEnv names step (other
// packages name their own steps: migrate's "migrate-round", ...).
func CrashPoint(step string) {
	if os.Getenv(CrashEnv) != step {
		return
	}
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; wait for it to land
}
