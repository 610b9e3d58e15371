// Package memread reads the private memory of a running process without
// stopping it, and keeps the per-page digests that let live migration's
// pre-copy rounds send only what changed since it was last sent.
//
// It owns: which mappings count as private memory (Regions, from
// /proc/PID/maps: the private anonymous ones CRIU dumps as pages), which of
// their pages exist (/proc/PID/pagemap: present or swapped), reading those
// pages with process_vm_readv in batches of at most 1 MiB, the page digest
// (SHA-256, PageDigest), and the Tracker that remembers, per process and
// page, the digest last scanned or noted.
//
// It must not touch the process it reads: it never writes to it, stops,
// signals or ptraces it, and reads only the pages pagemap shows present or
// swapped, so memory the process never touched is not faulted in (a
// swapped page is read, and so swapped back in; a page discarded between
// pagemap and the read reads as zeros, mapping the shared zero page). It
// knows nothing of the destination, the network, CRIU or the store: what
// to do with a changed page is the caller's function, and the Tracker
// records a page's new digest only once that function has accepted it.
//
// Access is the kernel's ptrace rule (PTRACE_MODE_READ for the /proc
// files, PTRACE_MODE_ATTACH for process_vm_readv): a user reads their own
// dumpable processes; reading another user's, or a non-dumpable one,
// needs CAP_SYS_PTRACE. Where Yama's ptrace_scope is 1 (Ubuntu's
// default) process_vm_readv also needs the target to be a descendant of
// the reader, or CAP_SYS_PTRACE. A refusal is an error that matches
// fs.ErrPermission.
package memread
