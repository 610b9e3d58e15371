package criu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The tests in this file run the real CRIU on a small real program (tier 2):
// they need CRIU (CRYO_CRIU, else the repository's .deps/criu/sbin/criu),
// usable by whoever runs them: root, or a user when it has its file
// capability (then as CRIU --unprivileged). Without it they skip and say
// why, except under CRYO_NO_SKIP=1, where they fail; -short skips them.

func realCRIU(t *testing.T) Binary {
	t.Helper()
	if testing.Short() {
		t.Skip("runs CRIU; -short skips it")
	}
	cannot := func(reason string) {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatalf("cannot run, and CRYO_NO_SKIP=1 forbids skipping: %s", reason)
		}
		t.Skip(reason)
	}
	p := os.Getenv("CRYO_CRIU")
	if p == "" {
		p, _ = filepath.Abs("../../.deps/criu/sbin/criu")
	}
	b, err := Locate(p, func(string) string { return "" })
	if err != nil {
		cannot(err.Error())
	}
	b, err = Vet(t.Context(), b, "")
	if err != nil {
		cannot(err.Error())
	}
	return b
}

// TestDumpParseRestore dumps a sleeping process, reads its images the way
// cryo does, and restores it.
func TestDumpParseRestore(t *testing.T) {
	b := realCRIU(t)
	v, err := Version(t.Context(), b.Path)
	if err != nil || v != b.Version {
		t.Errorf("Version over RPC = %d, %v; `criu --version` said %d", v, err, b.Version)
	}

	dir := t.TempDir()
	out, err := os.Create(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command("sleep", "600")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	reaped := make(chan struct{})
	go func() { _ = cmd.Wait(); close(reaped) }()
	defer func() { _ = cmd.Process.Kill(); <-reaped }()

	images := filepath.Join(dir, "images")
	if err := os.Mkdir(images, 0o700); err != nil {
		t.Fatal(err)
	}
	o := Options{ImagesDir: images, WorkDir: dir, LogFile: "dump.log", Pid: pid, LeaveRunning: true, ShellJob: true}
	if err := Dump(t.Context(), b, o, nil); err != nil {
		t.Fatalf("dump of pid %d: %v", pid, err)
	}
	if st := procState(pid); st == 0 || st == 'Z' {
		t.Fatalf("pid %d is not running after a leave-running dump (state %q)", pid, st)
	}

	tasks, err := ReadTree(images)
	if err != nil {
		t.Fatal(err)
	}
	if len(tasks) != 1 || tasks[0].PID != pid || tasks[0].Comm != "sleep" || tasks[0].Threads != 1 ||
		len(tasks[0].TIDs) != 1 || tasks[0].TIDs[0] != pid || tasks[0].SID != pid {
		t.Errorf("ReadTree = %+v, want one task: pid %d, comm sleep, one thread, its own session", tasks, pid)
	}

	stats, err := ReadDumpStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	if stats.PagesScanned == 0 || stats.PagesWritten == 0 || stats.PagesWritten > stats.PagesScanned {
		t.Errorf("ReadDumpStats = %+v", stats)
	}

	runs, err := PageRuns(images)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) == 0 {
		t.Fatal("PageRuns found no pages images")
	}
	for name, rs := range runs {
		st, err := os.Stat(filepath.Join(images, name))
		if err != nil {
			t.Errorf("PageRuns names %s: %v", name, err)
			continue
		}
		// The runs tile the pages image in order.
		var off int64
		var pages uint64
		for _, r := range rs {
			if r.Offset != off {
				t.Errorf("%s: run at %#x starts at offset %d, want %d", name, r.Vaddr, r.Offset, off)
			}
			off += int64(r.Pages * PageSize)
			pages += r.Pages
		}
		if off != st.Size() {
			t.Errorf("%s: runs cover %d bytes, the file has %d", name, off, st.Size())
		}
		if int64(pages) != stats.PagesWritten {
			t.Errorf("%s: %d pages in runs, CRIU wrote %d", name, pages, stats.PagesWritten)
		}
		cuts := Cuts(rs, 512<<10)
		for i, c := range cuts {
			if c < 0 || c >= st.Size() || (i > 0 && c < cuts[i-1]) {
				t.Errorf("%s: cuts %v out of order or outside the file (%d bytes)", name, cuts, st.Size())
				break
			}
		}
	}

	// Restore needs the PID: end the original first.
	_ = cmd.Process.Kill()
	<-reaped
	rpid, err := Restore(t.Context(), b, Options{ImagesDir: images, WorkDir: dir, LogFile: "restore.log", ShellJob: true, RestoreDetached: true}, nil)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	defer func() {
		if exe, _ := os.Readlink("/proc/" + strconv.Itoa(rpid) + "/exe"); strings.HasSuffix(exe, "/sleep") {
			_ = syscall.Kill(rpid, syscall.SIGKILL)
		}
	}()
	if rpid != pid {
		t.Errorf("restored pid %d, want %d", rpid, pid)
	}
	if st := procState(rpid); st == 0 || st == 'Z' {
		t.Errorf("restored pid %d is not running (state %q)", rpid, st)
	}
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(rpid) + "/cmdline")
	if string(cmdline) != "sleep\x00600\x00" {
		t.Errorf("restored process runs %q, want sleep 600", cmdline)
	}
}

// TestDumpFailureExplains dumps a PID that does not exist: the error is a
// *Error that carries CRIU's Error lines and the path of its full log.
func TestDumpFailureExplains(t *testing.T) {
	b := realCRIU(t)
	dir := t.TempDir()
	pid := 0
	for p := 30000; p > 1000; p -= 97 {
		if procState(p) == 0 {
			pid = p
			break
		}
	}
	err := Dump(t.Context(), b, Options{ImagesDir: dir, LogFile: "dump.log", Pid: pid}, nil)
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("dump of free pid %d: %v, want a *criu.Error", pid, err)
	}
	if ce.Log != filepath.Join(dir, "dump.log") {
		t.Errorf("error points at log %q, want %q", ce.Log, filepath.Join(dir, "dump.log"))
	}
	if _, serr := os.Stat(ce.Log); serr != nil {
		t.Errorf("the log the error points at: %v", serr)
	}
	msg := err.Error()
	if !strings.Contains(msg, "CRIU log errors:") || !strings.Contains(msg, "full CRIU log: "+ce.Log) {
		t.Errorf("error %q should quote CRIU's Error lines and name the log", msg)
	}
}

// TestDumpCancelled cancels a dump as it starts: CRIU is stopped promptly
// and the process runs on, neither killed nor left frozen.
func TestDumpCancelled(t *testing.T) {
	b := realCRIU(t)
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	start := time.Now()
	err := Dump(ctx, b, Options{ImagesDir: t.TempDir(), LogFile: "dump.log", Pid: cmd.Process.Pid, LeaveRunning: true, ShellJob: true}, nil)
	if took := time.Since(start); took > 15*time.Second {
		t.Errorf("a cancelled dump took %v", took)
	}
	t.Logf("cancelled dump: %v", err) // CRIU may or may not finish first
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := procState(cmd.Process.Pid)
		if st == 'S' || st == 'R' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the process is in state %q after a cancelled dump, want running or sleeping", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// procState is the state letter of pid, or 0 when no process holds it.
func procState(pid int) byte {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return 0
	}
	return s[i+2]
}
