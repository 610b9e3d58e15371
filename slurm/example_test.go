package slurm_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/slurm"
)

// A batch job finds its store the way `cryo run` does: from SLURM_JOB_ID,
// under the submit directory (or a configured root). The job ID survives a
// requeue, and so does the store.
func ExampleJobFromEnv() {
	env := map[string]string{
		"SLURM_JOB_ID":        "4242",
		"SLURM_SUBMIT_DIR":    "/home/ada/sim",
		"SLURM_RESTART_COUNT": "1",
	}
	job, err := slurm.JobFromEnv(func(k string) string { return env[k] })
	if err != nil {
		log.Fatal(err)
	}
	store, _ := job.Store("")
	fmt.Println("store:", store)
	fmt.Println("requeued before:", job.RestartCount, "times")
	site, _ := job.Store("/scratch/cryo")
	fmt.Println("with a site root:", site)

	_, err = slurm.JobFromEnv(func(string) string { return "" })
	fmt.Println(errors.Is(err, slurm.ErrNotSlurm))
	// Output:
	// store: /home/ada/sim/cryo-4242
	// requeued before: 1 times
	// with a site root: /scratch/cryo/cryo-4242
	// true
}

// A scheduler's prolog prepares the job's store for the job's user, and
// cryo.List shows what it holds: nothing yet.
func ExampleProlog() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := slurm.Job{ID: "4242", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work, Node: "n17"}

	rep, err := slurm.Prolog(context.Background(), job, slurm.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("created:", filepath.Base(rep.Store), rep.Created)
	st, _ := os.Stat(rep.Store)
	fmt.Println("mode:", st.Mode().Perm())

	gens, err := cryo.List(context.Background(), rep.Store)
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
func ExampleEpilog() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := slurm.Job{ID: "4242", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work}
	ctx := context.Background()
	if _, err := slurm.Prolog(ctx, job, slurm.HookOptions{LeaveOrphans: true}); err != nil {
		log.Fatal(err)
	}
	ok := 0
	job.Exited = &ok // the batch script exited 0
	rep, err := slurm.Epilog(ctx, job, slurm.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("removed:", rep.Removed, "-", rep.Why)
	// Output:
	// removed: true - cryo run never ran in this store
}

// A batch job asks Slurm to requeue it, after checkpointing itself.
func ExampleJob_Requeue() {
	job, err := slurm.JobFromEnv(os.Getenv)
	if err != nil {
		return // not in a Slurm job
	}
	if err := job.Requeue(context.Background(), ""); err != nil {
		log.Print(err)
	}
}
