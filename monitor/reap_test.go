package monitor

import (
	"errors"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// A process is signalled only if it is still the one that was found: a
// PID now held by another process (another start time) is left alone.
func TestSignalSameChecksTheProcess(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	st, err := proc.ReadStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := signalSame(st.PID, st.StartTime+1, syscall.SIGKILL); !errors.Is(err, errNotSame) {
		t.Errorf("another start time: %v, want errNotSame", err)
	}
	if !proc.Live(st.PID) {
		t.Fatal("a process with another start time was killed")
	}
	if err := signalSame(st.PID, st.StartTime, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
}

// endJob ends the job's processes among the caller's children and leaves
// everyone else alone, even a process holding a PID the job had.
func TestEndJobTakesOnlyTheJob(t *testing.T) {
	job := exec.Command("/bin/sh", "-c", "sleep 60 & wait")
	job.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	other := exec.Command("sleep", "60") // our child, in our session: not the job's
	for _, c := range []*exec.Cmd{job, other} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	st, _ := proc.ReadStat(job.Process.Pid)
	done := make(chan struct{})
	go func() { job.Wait(); close(done) }()
	// The job as the supervisor knows it once job-init is gone: the
	// sessions its processes were in. The other child shares ours.
	time.Sleep(50 * time.Millisecond)
	err := endJob(JobProcs{Sessions: map[int]bool{st.SID: true}}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the job's process was not ended")
	}
	if !proc.Live(other.Process.Pid) {
		t.Error("a process outside the job was killed")
	}
}
