package restore

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/store"
)

// A PID whose process is gone is still taken while a process of the group
// or session it led lives: CRIU's fork for it fails with "File exists"
// although /proc/PID does not exist. The check must see that, name the
// holder, and leave it alone.
func TestPIDsFreeSeesGroupsAndSessions(t *testing.T) {
	// A session leader that starts a member and exits: its PID stays the
	// session and group of the member.
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "leader")
	cmd := exec.Command("/bin/sh", "-c", "echo $$ > "+pidFile+"; sleep 60 & exit 0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	leader, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	var member int
	all, _ := proc.All()
	for p, st := range all {
		if st.SID == leader && p != leader {
			member = p
		}
	}
	if member == 0 {
		t.Fatal("the session's member was not found")
	}
	t.Cleanup(func() { syscall.Kill(member, syscall.SIGKILL) })
	if proc.Exists(leader) {
		t.Fatalf("the leader %d still exists", leader)
	}

	m := &store.Manifest{Job: store.Job{Processes: []store.Process{{PID: leader, Comm: "job"}}}}
	start := time.Now()
	err = pidsFree(context.Background(), m, 5*time.Second, slog.New(slog.DiscardHandler))
	var pe *PIDError
	if !errors.As(err, &pe) || !errors.Is(err, ErrPIDInUse) || !pe.Live || pe.Holder.PID != member {
		t.Fatalf("pid %d, the session of live pid %d: got %v, want a live PIDError naming pid %d", leader, member, err, member)
	}
	if !strings.Contains(err.Error(), "session") && !strings.Contains(err.Error(), "process group") {
		t.Errorf("the error does not say how the number is held: %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("a live holder was waited for (%v)", time.Since(start))
	}
	if !proc.Live(member) {
		t.Errorf("the holder %d was disturbed", member)
	}

	// Once the member is gone (and reaped by init), the number is free.
	syscall.Kill(member, syscall.SIGKILL)
	if err := pidsFree(context.Background(), m, 10*time.Second, slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("after the member ended: %v", err)
	}
}
