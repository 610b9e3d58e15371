// Package migrate moves a running job to another node: pre-copy rounds
// while it runs, then a short stop, and the job restored at the
// destination; or, when the destination fails at any point, the job
// carrying on at the source with nothing lost.
//
// Both sides talk over an authenticated, encrypted connection
// (internal/wire: a pre-shared key file both users hold).
//
//	source                                   destination
//	hello {job, pages}                  ->
//	                                    <-   welcome
//	round k: pages that changed         ->   written at their address into a
//	         (per-page SHA-256 digests)      RAM file per process
//	round end                           ->
//	                                    <-   round ack
//	... until the dirty set is under the threshold or stops shrinking
//	job stopped: CRIU dump, pages
//	compared with what was sent; only
//	changed pages, then every other
//	image, then the manifest            ->   pages images assembled; the
//	                                         generation committed to its
//	                                         store; the job restored
//	                                    <-   restored (the downtime ends)
//	                                    <-   running (alive for the grace)
//	job killed here                     ->   ended
//
// The source keeps the job stopped, never killed, until the destination
// says it runs; any error, a lost connection included, before "running"
// resumes it at the source with its output files cut back to the freeze
// (Send's rollback), and the destination ends its copy and removes what it
// committed (Incoming.Fail). Correctness never rests on the rounds: a page
// is left out of the final transfer only when its content digest equals
// the digest of what the destination was sent for that address.
//
// The job's own processes are read live (internal/memread) while it runs.
// The package knows nothing of supervision: the caller (monitor) says
// which processes are the job's, how to dump it (checkpoint.Hold), and
// runs the restored job.
package migrate
