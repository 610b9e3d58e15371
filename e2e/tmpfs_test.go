package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A job without namespaces of its own keeps state in tmpfs files (POSIX
// shared memory in /dev/shm) that CRIU reopens by path but does not save:
// cryo saves their contents with each checkpoint and brings them back
// before CRIU restores, so that a job whose segment was deleted (as MPI
// launchers delete /dev/shm/vader_segment.* when a rank dies) or changed
// after the checkpoint finishes as an uninterrupted run does.

// shmName is a segment name of this test alone, whose files are removed at
// its end.
func shmName(t *testing.T, what string) string {
	t.Helper()
	name := fmt.Sprintf("cryo-e2e-%d-%d-%s", os.Getpid(), time.Now().UnixNano(), what)
	t.Cleanup(func() {
		os.Remove("/dev/shm/" + name)
		os.Remove("/dev/shm/" + name + ".acc")
	})
	return name
}

const shmSteps = 120

func shmReference(t *testing.T) string {
	t.Helper()
	return reference(t, "shm", "-name", shmName(t, "ref"), "-steps", strconv.Itoa(shmSteps))
}

// TestRunRestoresTmpfsFiles: cryo run --namespaces off, a checkpoint a
// second; once one is committed, the job's process deletes its shared
// memory files (or scribbles over them) and kills itself. cryo restores the
// newest checkpoint, the files as they were then, and the job finishes
// with an uninterrupted run's result, each step printed once.
func TestRunRestoresTmpfsFiles(t *testing.T) {
	criu := requireCRIU(t)
	want := shmReference(t)
	for _, fault := range []string{"delete", "change"} {
		t.Run(fault, func(t *testing.T) {
			dir := t.TempDir()
			st, ff, name := filepath.Join(dir, "store"), filepath.Join(dir, "fault"), shmName(t, fault)
			r := startRun(t, criu, "--store", st, "--namespaces", "off", "--interval", "1s", "--",
				bin("shm"), "-name", name, "-steps", strconv.Itoa(shmSteps), "-delay", "25ms", "-fault-file", ff, "-fault", fault)
			r.waitFor(t, "checkpoint: generation 1", 30*time.Second)
			at := readProgress(t, r.out).last()
			if err := os.WriteFile(ff, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			code := r.wait(t, 90*time.Second)
			msgs := r.messages(t)
			if _, err := os.Stat(ff); err == nil {
				t.Fatalf("the fault never struck: the test proves nothing\ncryo said:\n%s", msgs)
			}
			if code != 0 || !strings.Contains(msgs, "restored: generation") {
				t.Fatalf("cryo run exited %d, want 0 after a restore\ncryo said:\n%s", code, msgs)
			}
			p := readProgress(t, r.out)
			if p.result != want {
				t.Errorf("the restored job finished with %q, want %q (an uninterrupted run's)\ncryo said:\n%s", p.result, want, msgs)
			}
			checkRun(t, "the job restored with its shared memory", p.steps, 1, shmSteps)
			if at >= shmSteps {
				t.Errorf("the job had finished (step %d) before the fault", at)
			}
		})
	}
}

// TestUserRestoresTmpfsFiles: a user's own job (no namespaces: started
// directly), checkpointed with --kill; its shared memory files are then
// deleted, as a launcher would. The user's restore (streamed, and
// materialized with --no-stream) brings them back, the user's own, and the
// job finishes with an uninterrupted run's result.
func TestUserRestoresTmpfsFiles(t *testing.T) {
	criu, u := requireUser(t)
	want := shmReference(t)
	for _, flags := range [][]string{nil, {"--no-stream"}} {
		t.Run(fmt.Sprintf("restore%s", strings.Join(append([]string{""}, flags...), " ")), func(t *testing.T) {
			dir := u.dir(t)
			st, out, name := filepath.Join(dir, "store"), filepath.Join(dir, "job.out"), shmName(t, "user")
			j := u.startJob(t, "shm", out, "-name", name, "-steps", strconv.Itoa(shmSteps), "-delay", "25ms")
			waitStep(t, out, 10, 30*time.Second)
			if r := u.cryo(t, criu, "checkpoint", "--store", st, "--kill", strconv.Itoa(j.pid)); r.code != 0 {
				t.Fatalf("a user's checkpoint --kill failed: %s", r)
			}
			j.waitExit(t, 10*time.Second)
			at := readProgress(t, out).last()
			if r := u.cryo(t, criu, "inspect", "--store", st); r.code != 0 || !strings.Contains(r.stdout, "tmpfs files (2)") ||
				!strings.Contains(r.stdout, "/dev/shm/"+name+"  0.2 MiB, mode 0600") {
				t.Errorf("inspect does not list the job's two tmpfs files: %s", r)
			}
			for _, p := range []string{"/dev/shm/" + name, "/dev/shm/" + name + ".acc"} {
				if err := os.Remove(p); err != nil {
					t.Fatalf("the job's shared memory: %v", err)
				}
			}
			r := u.cryo(t, criu, append([]string{"restore", "--store", st}, flags...)...)
			if r.code != 0 {
				t.Fatalf("a user's restore of a job whose shared memory was deleted: %s", r)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
			if err != nil {
				t.Fatalf("restore printed %q, not a PID", r.stdout)
			}
			if !strings.Contains(r.stderr, "tmpfs file brought back to the checkpoint: created /dev/shm/"+name+" (") {
				t.Errorf("the restore did not say it brought the segment back:\n%s", r.stderr)
			}
			for _, p := range []string{"/dev/shm/" + name, "/dev/shm/" + name + ".acc"} {
				var s syscall.Stat_t
				if err := syscall.Stat(p, &s); err != nil || int(s.Uid) != u.uid || s.Mode&0o777 != 0o600 {
					t.Errorf("%s after the restore: uid %d mode %#o (%v), want the user's, 0600", p, s.Uid, s.Mode&0o777, err)
				}
			}
			waitEnded(t, time.Minute, pid)
			p := readProgress(t, out)
			if p.result != want {
				t.Errorf("the restored job finished with %q, want %q (an uninterrupted run's); output %s %q", p.result, want, compact(p.steps), p.other)
			}
			checkRun(t, "the job restored with its shared memory", p.steps, 1, shmSteps)
			if at < 10 || at >= shmSteps {
				t.Errorf("the job was checkpointed at step %d", at)
			}
		})
	}
}
