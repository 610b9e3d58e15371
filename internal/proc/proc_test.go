package proc

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// statLine builds a /proc/<pid>/stat line: pid (comm) state ppid pgrp
// session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
// cstime priority nice num_threads itrealvalue starttime vsize ...
func statLine(pid int, comm string, state string) string {
	return strings.Join([]string{
		strconv.Itoa(pid), "(" + comm + ")", state, "1", "100", "100", "0", "-1", "4194560",
		"10", "0", "0", "0", "250", "50", "0", "0", "20", "0", "7", "0", "123456", "1000000", "300",
	}, " ") + "\n"
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		name    string
		line    string
		comm    string
		state   byte
		kernel  bool
		wantErr bool
	}{
		{"plain", statLine(42, "solver", "S"), "solver", 'S', false, false},
		{"spaces", statLine(42, "my solver v2", "R"), "my solver v2", 'R', false, false},
		{"parentheses", statLine(42, "a) (b", "Z"), "a) (b", 'Z', false, false},
		{"looks like fields", statLine(42, "x) R 1 2 3 (y", "T"), "x) R 1 2 3 (y", 'T', false, false},
		{"empty comm", statLine(42, "", "D"), "", 'D', false, false},
		// flags 0x208040: PF_KTHREAD among others.
		{"kernel thread", strings.Replace(statLine(42, "kworker/0:1", "I"), " 4194560 ", " 2129984 ", 1), "kworker/0:1", 'I', true, false},
		{"no parentheses", "42 solver S 1 100 100", "", 0, false, true},
		{"cut after comm", "42 (solver)", "", 0, false, true},
		{"short", "42 (solver) S 1 100 100 0\n", "", 0, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := parseStat(42, tc.line)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("parseStat(%q) = %+v, want an error", tc.line, st)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := Stat{PID: 42, Comm: tc.comm, State: tc.state, PPID: 1, PGID: 100, SID: 100,
				CPUTicks: 300, Threads: 7, StartTime: 123456, Kernel: tc.kernel}
			if st != want {
				t.Errorf("parseStat = %+v, want %+v", st, want)
			}
		})
	}
}

func TestReadStatSelf(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.PID != os.Getpid() || st.PPID != os.Getppid() || st.Threads < 1 || st.StartTime == 0 {
		t.Errorf("ReadStat(self) = %+v", st)
	}
	if !Live(os.Getpid()) || !Exists(os.Getpid()) {
		t.Error("this process is neither live nor existing")
	}
	if st.Kernel {
		t.Error("this process is called a kernel thread")
	}
	// PID 2 is kthreadd wherever there is a kernel thread to see.
	if kt, err := ReadStat(2); err == nil && kt.Comm == "kthreadd" && !kt.Kernel {
		t.Errorf("kthreadd (pid 2) is not called a kernel thread: %+v", kt)
	}
}

func TestNoProcess(t *testing.T) {
	pid := freePID(t)
	if _, err := ReadStat(pid); !errors.Is(err, ErrNoProcess) {
		t.Errorf("ReadStat(%d) = %v, want ErrNoProcess", pid, err)
	}
	if Live(pid) || Exists(pid) {
		t.Errorf("free pid %d reported live or existing", pid)
	}
	if err := WaitGone(context.Background(), pid); err != nil {
		t.Errorf("WaitGone(free pid) = %v", err)
	}
	if _, err := Tree(pid); !errors.Is(err, ErrNoProcess) {
		t.Errorf("Tree(%d) = %v, want ErrNoProcess", pid, err)
	}
}

// TestZombie checks that a dead, unreaped child is not live but still
// exists, and that WaitGone waits until it is reaped.
func TestZombie(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", "exit 0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for Live(pid) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	st, err := ReadStat(pid)
	if err != nil || st.State != 'Z' {
		t.Fatalf("exited child: %+v, %v; want a zombie", st, err)
	}
	if Live(pid) || !Exists(pid) {
		t.Errorf("zombie %d: Live %v, Exists %v; want false, true", pid, Live(pid), Exists(pid))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := WaitGone(ctx, pid); err == nil {
		t.Error("WaitGone returned while the zombie was not reaped")
	}
	time.AfterFunc(50*time.Millisecond, func() { _ = cmd.Wait() })
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := WaitGone(ctx2, pid); err != nil {
		t.Errorf("WaitGone after reaping: %v", err)
	}
}

func TestTree(t *testing.T) {
	// sh -> sleep: a child and a grandchild of this test.
	cmd := exec.Command("/bin/sh", "-c", "sleep 30 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var pids []int
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		pids, _ = Tree(os.Getpid())
		if slices.Contains(pids, cmd.Process.Pid) && len(pids) >= 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(pids) < 3 || pids[0] != os.Getpid() || !slices.Contains(pids, cmd.Process.Pid) {
		t.Fatalf("Tree(self) = %v, want self first, then sh %d and its sleep", pids, cmd.Process.Pid)
	}
	sub, err := Tree(cmd.Process.Pid)
	if err != nil || len(sub) != 2 || sub[0] != cmd.Process.Pid {
		t.Errorf("Tree(sh) = %v, %v; want sh and sleep", sub, err)
	}
	if rss, err := RSS(cmd.Process.Pid); err != nil || rss <= 0 {
		t.Errorf("RSS(sh) = %d, %v", rss, err)
	}
}

// freePID returns a PID no process holds right now.
func freePID(t *testing.T) int {
	t.Helper()
	for pid := 4_000_000; pid > 1000; pid -= 7919 {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
			return pid
		}
	}
	t.Fatal("no free pid found")
	return 0
}
