package memread

import (
	"context"
	"os"
	"syscall"
	"testing"
	"time"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestDiag(t *testing.T) {
	if os.Getenv("DIAG") == "" {
		t.Skip()
	}
	c := startChild(t, 131072)
	c.do(t, "write 0 131072 0")
	tr := NewTracker()
	for i := range 8 {
		w, u := time.Now(), cpuTime()
		st, err := tr.Scan(context.Background(), 1, c.cmd.Process.Pid, func(Run) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("scan %d: wall %v cpu %v pages %d changed %d", i, time.Since(w), cpuTime()-u, st.Pages, st.Changed)
	}
}

func TestDiagSparse(t *testing.T) {
	if os.Getenv("DIAG") == "" {
		t.Skip()
	}
	const size = 1 << 40
	p, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS|syscall.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	p[0] = 1
	p[size/2] = 1
	tr := NewTracker()
	for i := range 2 {
		w, u := time.Now(), cpuTime()
		st, err := tr.Scan(context.Background(), 1, os.Getpid(), func(Run) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("sparse 1 TiB, scan %d: wall %v cpu %v pages %d", i, time.Since(w), cpuTime()-u, st.Pages)
	}
	syscall.Munmap(p)
}

func TestDiagPid(t *testing.T) {
	p := os.Getenv("DIAG_PID")
	if p == "" {
		t.Skip()
	}
	var pid int
	for _, c := range p {
		pid = pid*10 + int(c-'0')
	}
	st, err := NewTracker().Scan(context.Background(), 1, pid, func(Run) error { return nil })
	t.Logf("uid %d scanning %d: %+v %v", os.Getuid(), pid, st, err)
}
