package cryo_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/cryo-hpc/cryo"
)

// A batch job finds its store the way `cryo run` does: from SLURM_JOB_ID,
// under the submit directory (or a configured root). The job ID survives a
// requeue, and so does the store.
func ExampleSlurmJobFromEnv() {
	env := map[string]string{
		"SLURM_JOB_ID":        "4242",
		"SLURM_SUBMIT_DIR":    "/home/ada/sim",
		"SLURM_RESTART_COUNT": "1",
	}
	job, err := cryo.SlurmJobFromEnv(func(k string) string { return env[k] })
	if err != nil {
		log.Fatal(err)
	}
	store, _ := job.Store("")
	fmt.Println("store:", store)
	fmt.Println("requeued before:", job.RestartCount, "times")
	site, _ := job.Store("/scratch/cryo")
	fmt.Println("with a site root:", site)

	_, err = cryo.SlurmJobFromEnv(func(string) string { return "" })
	fmt.Println(errors.Is(err, cryo.ErrNotSlurm))
	// Output:
	// store: /home/ada/sim/cryo-4242
	// requeued before: 1 times
	// with a site root: /scratch/cryo/cryo-4242
	// true
}

// A scheduler's prolog prepares the job's store for the job's user, and
// List shows what it holds: nothing yet.
func ExampleSlurmProlog() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := cryo.SlurmJob{ID: "4242", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work, Node: "n17"}

	rep, err := cryo.SlurmProlog(context.Background(), job, cryo.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("created:", filepath.Base(rep.Store), rep.Created)
	st, _ := os.Stat(rep.Store)
	fmt.Println("mode:", st.Mode().Perm())

	gens, err := cryo.List(rep.Store)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("generations:", len(gens))
	// Output:
	// created: cryo-4242 true
	// mode: -rwx------
	// generations: 0
}

// The epilog keeps the store of a job that is unfinished (stopped for a
// requeue) and deletes the store of one that completed, or that never used
// it.
func ExampleSlurmEpilog() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := cryo.SlurmJob{ID: "4242", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work}
	ctx := context.Background()
	if _, err := cryo.SlurmProlog(ctx, job, cryo.HookOptions{LeaveOrphans: true}); err != nil {
		log.Fatal(err)
	}
	ok := 0
	job.Exited = &ok // the batch script exited 0
	rep, err := cryo.SlurmEpilog(ctx, job, cryo.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("removed:", rep.Removed, "-", rep.Why)
	// Output:
	// removed: true - cryo run never ran in this store
}

// Verify re-hashes every chunk of every generation and names what is
// damaged.
func ExampleVerify() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := cryo.SlurmJob{ID: "7", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work}
	rep, err := cryo.SlurmProlog(context.Background(), job, cryo.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	vs, err := cryo.Verify(context.Background(), rep.Store, 0)
	if err != nil {
		log.Fatal(err)
	}
	damaged := 0
	for _, v := range vs {
		if !v.Intact {
			damaged++
			fmt.Println("generation", v.Generation, "is damaged:", v.Problems)
		}
	}
	fmt.Println(len(vs), "generations,", damaged, "damaged")
	// Output:
	// 0 generations, 0 damaged
}

// Checkpoint a running process tree into its job's store, stopping it once
// the checkpoint is committed (as before a requeue), then restore it later.
// Both need root and CRIU ($CRYO_CRIU or criu on PATH), so this example is
// compiled but not run.
func ExampleCheckpoint() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := cryo.Checkpoint(ctx, cryo.CheckpointOptions{
		Store: "/scratch/cryo/cryo-4242",
		PID:   12345, // the job's root process
		Stop:  true,
		Keep:  3,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("generation %d: %d processes, frozen %v\n", res.Generation, res.Processes, res.Frozen)

	// Later, perhaps on another node with the same files: the newest
	// generation that verifies is restored, older ones are fallen back on.
	r, err := cryo.Restore(ctx, cryo.RestoreOptions{Store: "/scratch/cryo/cryo-4242"})
	switch {
	case errors.Is(err, cryo.ErrPIDInUse):
		log.Fatal("a process on this node holds one of the job's PIDs: ", err)
	case err != nil:
		log.Fatal(err)
	}
	fmt.Printf("restored generation %d as pid %d (skipped: %v)\n", r.Generation, r.PID, r.Skipped)
}

// A batch job asks Slurm to requeue it, after checkpointing itself.
func ExampleSlurmJob_Requeue() {
	job, err := cryo.SlurmJobFromEnv(os.Getenv)
	if err != nil {
		return // not in a Slurm job
	}
	if err := job.Requeue(context.Background(), ""); err != nil {
		log.Print(err)
	}
}
