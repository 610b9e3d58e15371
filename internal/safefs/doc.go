// Package safefs works on files in directories that someone else may
// write to: it opens, creates, chowns and removes them through directory
// file descriptors, one path component at a time, and never follows a
// symbolic link. It is for cryo running as root in a place a user
// controls (the Slurm Prolog and Epilog in the job's store), where a path
// looked up twice can lead somewhere else the second time, and a planted
// link would make root write or delete elsewhere.
//
// A Dir is an open directory. Names given to its methods are single path
// components ("staging", not "a/b"), so nothing is resolved beyond the
// directory itself; OpenBeneath resolves a relative path inside it without
// symbolic links (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS). Dir.Path is
// the directory's /proc/self/fd/N name, for code that needs a path: it
// always names the directory that was opened, but the components below it
// are then looked up by name again.
//
// Reads are bounded (ReadFileBeneath takes a limit). It owns no policy:
// who may own what is the caller's business.
package safefs
