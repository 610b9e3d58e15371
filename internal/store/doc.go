// Package store owns cryo's on-disk checkpoint store: its layout, the
// manifest format, content-addressed chunks, the commit protocol and
// retention.
//
//	<store>/
//	  cryo-store.json                  format version, created-by
//	  chunks/<2 hex>/<sha256>          zstd-compressed chunk, named by the SHA-256 of its content
//	  checkpoints/<gen>/manifest.json  written last; its presence means committed
//	  staging/                         work in progress; never read as a checkpoint
//	  staging/journal/                 intent journals of operations on a live job (offload
//	                                   contexts locked); kept by CleanStaging for recovery
//	  logs/                            CRIU logs of failed operations
//	  lock                             flock: one writer, or many readers
//
// A generation becomes visible only by renaming its staging directory to
// checkpoints/<gen> after every chunk and the manifest are durable (syncfs,
// fsync). A crash at any moment leaves either the complete generation or
// nothing but staging debris and unreferenced chunks, which the next writer
// and GC remove. Chunks are shared by generations and never rewritten.
//
// A replica is a second store that a Writer fills alongside, with
// byte-identical chunks and manifests, committed just before this store's;
// Repair and MaterializeFrom heal damage from it (see replica.go).
//
// The store knows nothing about CRIU or processes beyond the manifest's
// descriptive fields: callers say where a file is cut into chunks.
package store
