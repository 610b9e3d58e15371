package proc

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"testing"
)

func TestReadEnviron(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skip("no sleep command")
	}
	cmd := exec.Command("sleep", "30")
	cmd.Env = []string{"A=1"}
	for i := range 40 { // 200 KiB: beyond the first buffer
		cmd.Env = append(cmd.Env, fmt.Sprintf("CRYO_TEST_%d=%s", i, strings.Repeat("x", 5<<10)))
	}
	cmd.Env = append(cmd.Env, "LAST=yes")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// The child may still be exec'ing: its environment reads empty until then.
	var env []byte
	for range 1000 {
		var err error
		if env, _, err = ReadEnviron(cmd.Process.Pid, nil); err != nil {
			t.Fatal(err)
		}
		if len(env) > 0 {
			break
		}
	}
	if !EnvHasAll(env, [][]byte{[]byte("A=1"), []byte("LAST=yes")}) || len(env) < 200<<10 {
		t.Errorf("environment lacks A=1 and LAST=yes, or is short: %d bytes", len(env))
	}
	if EnvHasAll(env, [][]byte{[]byte("A=1"), []byte("A=2")}) {
		t.Errorf("EnvHasAll matched an entry that is not there")
	}
	if _, _, err := ReadEnviron(freePID(t), nil); err == nil {
		t.Errorf("environ of a free PID read without an error")
	}
}

func TestPIDsAndCmdline(t *testing.T) {
	pids, err := PIDs()
	if err != nil || !slices.Contains(pids, os.Getpid()) || !slices.IsSorted(pids) {
		t.Fatalf("PIDs: %d pids (self there: %v), %v", len(pids), slices.Contains(pids, os.Getpid()), err)
	}
	argv, err := Cmdline(os.Getpid())
	if err != nil || !slices.Equal(argv, os.Args) {
		t.Errorf("Cmdline of self: %q, %v; want %q", argv, err, os.Args)
	}
}

func TestSignalsHandled(t *testing.T) {
	signal.Ignore(syscall.SIGUSR2)
	t.Cleanup(func() { signal.Reset(syscall.SIGUSR2) })
	m, err := SignalsHandled(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if m&(1<<(syscall.SIGUSR2-1)) == 0 {
		t.Errorf("an ignored SIGUSR2 is not in the mask %x", m)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// sleep neither catches nor ignores SIGUSR1 (the ignored SIGUSR2 is
	// inherited across exec, as the kernel does).
	for range 1000 {
		if argv, _ := Cmdline(cmd.Process.Pid); len(argv) > 0 && argv[0] == "sleep" {
			break
		}
	}
	m, err = SignalsHandled(cmd.Process.Pid)
	if err != nil || m&(1<<(syscall.SIGUSR1-1)) != 0 {
		t.Errorf("sleep's handled signals %x, %v: SIGUSR1 must not be among them", m, err)
	}
}
