// Package store owns cryo's on-disk checkpoint store: its layout, the
// manifest format, content-addressed chunks in pack files, page deltas, the
// commit protocol, GC and repacking, retention, replicas and standbys.
//
//	<store>/
//	  cryo-store.json                  store format (2), created-by, the key of chunk names
//	  packs/<id>.pack                  chunk records, then an index of them (pack.go)
//	  chunks/<2 hex>/<sha256>          chunk files of a format-1 store (read; GC packs them)
//	  checkpoints/<gen>/manifest.json  written last; its presence means committed
//	  staging/                         work in progress; never read as a checkpoint
//	  staging/journal/                 intent journals of operations on a live job (offload
//	                                   contexts locked); kept by CleanStaging for recovery
//	  logs/                            CRIU logs of failed operations
//	  lock                             flock: one writer, or many readers
//
// Chunks are named by their content (keyed BLAKE3, digest.go), appended to
// a few large packs per generation, and stored whole or as the pages that
// differ from a whole base chunk (delta.go: at most two objects per
// chunk). A generation becomes visible only by renaming its staging
// directory to checkpoints/<gen> after every pack (each fsynced before it
// is named) and the manifest are durable. A crash at any moment leaves
// either the complete generation or nothing but staging debris and packs
// no generation uses, which the next writer and GC remove. Packs are never
// changed; GC copies what is in use out of mostly unused packs into new
// ones before it removes them (gc.go), and manifests name chunks, not
// where they are, so no manifest is rewritten.
//
// Everything inside the store is reached through its directory's
// descriptor, opened once, without following any link (beneath.go), and
// everything read from it (manifests, pack indexes, images) is bounded
// before anything is allocated for it: a store is a directory its owner can
// write, and cryo may be root.
//
// A replica is a second store that a Writer fills alongside, with the same
// key, byte-identical blobs and manifests, committed just before this
// store's; Repair and MaterializeFrom heal damage from it (see replica.go).
// A standby is such a copy on another node, filled through a caller's
// transport: the source exports its stored records and manifests as they
// are, and an Importer checks every record against its name before it
// appends it and commits the source's manifest under the source's number
// (see transfer.go). The store does no networking.
//
// The store knows nothing about CRIU or processes beyond the manifest's
// descriptive fields: callers say where a file is cut into chunks, and at
// which address a chunk of memory lies.
package store
