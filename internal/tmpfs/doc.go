// Package tmpfs keeps the tmpfs files of a job that has no mount namespace
// of its own consistent with its checkpoints. CRIU saves the contents of
// a tmpfs only when it dumps the mount namespace that holds it (cryo run's
// private /dev/shm and TMPDIR); a job that lives in the node's namespaces
// maps POSIX shared memory (/dev/shm/...) and holds tmpfs files that CRIU
// reopens by path at restore, by then deleted (as MPI launchers delete
// /dev/shm/vader_segment.* when a rank dies) or changed since.
//
// At a checkpoint, Scan lists the regular files on tmpfs file systems that
// the job's processes map or hold open, not deleted and seen by cryo at
// their path as the same inode, within bounds (MaxFiles, MaxBytes); Save,
// called while the job is frozen, copies their contents into a work
// directory in parts of at most PartSize, and Seal adds each file's
// digest once the job runs again. The Record (RecordName, with the parts
// named by DataName) goes into the generation. At a restore, before CRIU
// runs, Recreate brings each file back at its path with its contents and
// permissions where it is missing or differs: with the job owner's
// file-system identity (the caller's AsOwner), through directory
// descriptors one component at a time, never following a link, and only
// files and directories that belong to the job's owner (others' files are
// left as they are, and named). A file held only for appending (an
// output) is recreated when missing, never replaced.
//
// It reads /proc and the files the job uses; it never signals a process
// and writes nothing but the work directory it is given and the files it
// recreates. Who the owner is, and whether to act at all (not for a job
// in namespaces of its own), is the caller's decision.
package tmpfs
