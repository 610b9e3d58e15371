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
	"github.com/cryo-hpc/cryo/offload/drivers"
	"github.com/cryo-hpc/cryo/slurm"
)

// A new store holds no generations; List and Verify say so.
func ExampleList() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := slurm.Job{ID: "7", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work}
	rep, err := slurm.Prolog(context.Background(), job, slurm.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	gens, err := cryo.List(context.Background(), rep.Store)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(filepath.Base(rep.Store), "holds", len(gens), "generations")

	_, err = cryo.List(context.Background(), filepath.Join(work, "nowhere"))
	fmt.Println(errors.Is(err, cryo.ErrNoStore))
	// Output:
	// cryo-7 holds 0 generations
	// true
}

// Verify re-hashes every chunk of every generation and names what is
// damaged.
func ExampleVerify() {
	work, _ := os.MkdirTemp("", "example-job-")
	defer os.RemoveAll(work)
	job := slurm.Job{ID: "7", UID: os.Getuid(), GID: os.Getgid(), WorkDir: work}
	rep, err := slurm.Prolog(context.Background(), job, slurm.HookOptions{LeaveOrphans: true})
	if err != nil {
		log.Fatal(err)
	}
	vs, err := cryo.Verify(context.Background(), cryo.VerifyOptions{Store: rep.Store})
	if err != nil {
		log.Fatal(err)
	}
	damaged := 0
	for _, v := range vs {
		if !v.Intact {
			damaged++
			fmt.Println("generation", v.Generation, "is damaged:", v.Problems, v.Error)
		}
	}
	fmt.Println(len(vs), "generations,", damaged, "damaged")
	// Output:
	// 0 generations, 0 damaged
}

// Checkpoint a running process tree into its job's store, stopping it once
// the checkpoint is committed (as before a requeue), then restore it later.
// A tool that does both opens the node's offload drivers (GPUs) once.
// Both need root and CRIU ($CRYO_CRIU or criu on PATH), so this example is
// compiled but not run.
func ExampleCheckpoint() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	gpus := drivers.Open(drivers.Config{})
	defer gpus.Close()
	res, err := cryo.Checkpoint(ctx, cryo.CheckpointOptions{
		Store:   "/scratch/cryo/cryo-4242",
		PID:     12345, // the job's root process
		Kill:    true,
		Keep:    3,
		Offload: gpus,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("generation %d: %d processes, frozen %v\n", res.Generation, res.Processes, res.Frozen)

	// Later, perhaps on another node with the same files: the newest
	// generation, or with Fallback the newest older one that verifies.
	r, err := cryo.Restore(ctx, cryo.RestoreOptions{Store: "/scratch/cryo/cryo-4242", Fallback: true, Offload: gpus})
	switch {
	case errors.Is(err, cryo.ErrPIDInUse):
		log.Fatal("a process on this node holds one of the job's PIDs: ", err)
	case err != nil:
		log.Fatal(err)
	}
	fmt.Printf("restored generation %d as pid %d (skipped: %v)\n", r.Generation, r.PID, r.Skipped)
}

// A node without an NVIDIA driver has no GPUs: that is a status, not an
// error.
func ExampleGPUs() {
	st := cryo.GPUs(nil)
	if !st.HasDriver() {
		fmt.Println("no NVIDIA driver:", len(st.GPUs), "GPUs")
		return
	}
	fmt.Println(len(st.GPUs), "GPUs, checkpoint API:", st.CheckpointAPI)
}
